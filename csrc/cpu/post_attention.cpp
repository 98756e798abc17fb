// CPU kernel of t2t_kernels::post_attention: a transformer layer after its attention, on blocks of rows in cache.
//
//   x = skip + y Wp^T + bp;  out = x + gelu(layer_norm(x) W1^T + b1) W2^T + b2
//
// Each task takes kRows rows through the whole chain in per-thread scratch (a few tens of KB): three small matrix
// products (tiles.h's register-blocked gemm_rows2 against the transposed, zero-padded weights), the bias, skip,
// LayerNorm, GELU and residual passes between them vectorised over the row. y and skip are read once and the output is
// written once; in eager the chain writes and reads eight tensors of the output's size. Rows are independent, so the
// result does not depend on the number of threads. Math in the input dtype (float32 or float64).
// Layers with weights of megabytes (the backbone's) take the wide paths below instead: whole-matrix GEMMs (oneDNN's
// with fused epilogues in float32, else ATen's with fused passes between them).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "onednn_linear.h"
#include "tiles.h"

namespace t2t_kernels {
namespace {

constexpr int64_t kRows = 64;  // rows per task: the scratch tiles of a 64-wide layer stay in L1/L2
// outputs of at least this size are written with streaming stores (as the performer kernel's)
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// gelu(x) = x/2 erfc(-x/sqrt(2)), exact (erf) form. float: erfc from the Chebyshev fit of Numerical Recipes
// (relative error < 1.2e-7 for every argument) on the vectorised exp, so neither side of 0 loses precision to a
// 1 - erf cancellation; rounding the exponent -x^2/2 in fp32 adds about 3x^2 ulp of relative error on the left tail
// (124 ulp at x = -9.4, where gelu is 1e-20; torch's fp32 gelu returns 0 there). double: std::erfc per lane.
template <typename acc_t, int Bytes>
struct Gelu {
  using vec = typename Simd<acc_t, Bytes>::vec;
  const ScaledExp<acc_t, Bytes> exp1{acc_t(1)};
  // the fit's coefficients after its leading one, highest degree first
  static constexpr float kFit[] = {1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f,
                                   0.09678418f, 0.37409196f,  1.00002368f, -1.26551223f};

  // x = gelu(x) for U vectors, each step across all of them (each_vector): 4 at a time made the backbone's GELU pass
  // (1576 x 1152 at B=8) 35% faster than one at a time, with the same bits
  template <int U>
  T2T_INLINE void apply(vec (&x)[U]) const {
    if constexpr (std::is_same_v<acc_t, double>) {
      each_vector<U>([&](int u) {
        for (int i = 0; i < Simd<acc_t, Bytes>::kLanes; ++i) x[u][i] = 0.5 * x[u][i] * std::erfc(-x[u][i] * M_SQRT1_2);
      });
    } else {
      vec z[U], a[U], t[U], p[U];
      each_vector<U>([&](int u) {
        z[u] = x[u] * -0.70710678118654752f;  // erfc's argument
        a[u] = z[u] < 0 ? -z[u] : z[u];
        t[u] = 1.0f / (1.0f + 0.5f * a[u]);
        p[u] = 0.17087277f * t[u] - 0.82215223f;
      });
#pragma GCC unroll 8
      for (const float c : kFit) each_vector<U>([&](int u) { p[u] = p[u] * t[u] + c; });
      each_vector<U>([&](int u) {
        const vec erfc_a = t[u] * exp1(p[u] - a[u] * a[u]);  // erfc(|z|)
        const vec erfc_z = z[u] < 0 ? 2.0f - erfc_a : erfc_a;
        x[u] = 0.5f * x[u] * erfc_z;
      });
    }
  }

  T2T_INLINE vec operator()(vec x) const {
    vec one[1] = {x};
    apply(one);
    return one[0];
  }
};

// The passes between the products, one row at a time (E or H columns; whole vectors, then the rest one by one).

// x += bias + skip, then xn = layer_norm(x) * weight + bias_n (mean and variance in two passes over the row)
template <class I, typename acc_t>
T2T_INLINE void add_skip_and_normalize(acc_t* x, const acc_t* skip, const acc_t* bias, int64_t E, const acc_t* weight,
                                       const acc_t* bias_n, acc_t eps, acc_t* xn) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  const int64_t full = E / L * L;
  vec sum = vec{};
  int64_t e = 0;
  for (; e < full; e += L) {
    const vec v = S::load(x + e) + S::load(bias + e) + S::load(skip + e);
    S::store(x + e, v);
    sum += v;
  }
  acc_t tail = 0;
  for (; e < E; ++e) tail += (x[e] += bias[e] + skip[e]);
  const acc_t mean = (hsum<acc_t, I::kBytes>(sum) + tail) / acc_t(E);
  vec sq = vec{};
  for (e = 0; e < full; e += L) {
    const vec d = S::load(x + e) - mean;
    sq += d * d;
  }
  acc_t sq_tail = 0;
  for (; e < E; ++e) sq_tail += (x[e] - mean) * (x[e] - mean);
  const acc_t rstd = acc_t(1) / std::sqrt((hsum<acc_t, I::kBytes>(sq) + sq_tail) / acc_t(E) + eps);
  for (e = 0; e < full; e += L)
    S::store(xn + e, (S::load(x + e) - mean) * rstd * S::load(weight + e) + S::load(bias_n + e));
  for (; e < E; ++e) xn[e] = (x[e] - mean) * rstd * weight[e] + bias_n[e];
}

// h = gelu(h + bias)
template <class I, typename acc_t>
T2T_INLINE void add_bias_gelu(acc_t* h, const acc_t* bias, int64_t H, const Gelu<acc_t, I::kBytes>& gelu) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int U = 4;  // vectors per step (Gelu::apply)
  int64_t j = 0;
  for (; j + U * L <= H; j += U * L) {
    vec v[U];
    each_vector<U>([&](int u) { v[u] = S::load(h + j + u * L) + S::load(bias + j + u * L); });
    gelu.apply(v);
    each_vector<U>([&](int u) { S::store(h + j + u * L, v[u]); });
  }
  for (; j + L <= H; j += L) S::store(h + j, gelu(S::load(h + j) + S::load(bias + j)));
  for (; j < H; ++j) h[j] = gelu(vec{} + (h[j] + bias[j]))[0];
}

// dst = x + o + bias over E columns (dst may be x); stream: write dst with streaming stores (whole aligned vectors)
template <class I, typename acc_t>
T2T_INLINE void add_residual_row(acc_t* dst, const acc_t* x, const acc_t* o, const acc_t* bias, int64_t E,
                                 bool stream) {
  using S = Simd<acc_t, I::kBytes>;
  constexpr int L = S::kLanes;
  int64_t e = 0;
  for (; e + L <= E; e += L) {
    const typename S::vec v = S::load(x + e) + S::load(o + e) + S::load(bias + e);
    if (stream)
      stream_store<I>(dst + e, v);
    else
      S::store(dst + e, v);
  }
  for (; e < E; ++e) dst[e] = x[e] + o[e] + bias[e];
}

// the weights transposed and zero-padded to whole register blocks, and the vectors, in one buffer
template <typename acc_t>
struct Weights {
  std::unique_ptr<acc_t[]> buffer;
  const acc_t *wp, *w1, *w2, *bp, *b1, *b2, *nw, *nb;  // wp (D, Ep), w1 (E, Hp), w2 (H, Ep); vectors E or H long

  Weights(const at::Tensor* t, int64_t D, int64_t E, int64_t H, int64_t Ep, int64_t Hp) {
    // t: proj_weight, proj_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias (contiguous)
    const int64_t sizes[] = {D * Ep, E * Hp, H * Ep, E, H, E, E, E};
    int64_t total = 0;
    for (int64_t n : sizes) total += n;
    buffer.reset(new acc_t[total]());
    acc_t* part[8];
    acc_t* p = buffer.get();
    for (int i = 0; i < 8; ++i) part[i] = p, p += sizes[i];
    auto transpose_into = [](const at::Tensor& w, acc_t* out, int64_t cols_padded) {  // w (N, K) -> out (K, Np)
      const acc_t* src = w.data_ptr<acc_t>();
      const int64_t N = w.size(0), K = w.size(1);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) out[k * cols_padded + n] = src[n * K + k];
    };
    transpose_into(t[0], part[0], Ep);
    transpose_into(t[4], part[1], Hp);
    transpose_into(t[6], part[2], Ep);
    std::copy_n(t[1].data_ptr<acc_t>(), E, part[3]);
    std::copy_n(t[5].data_ptr<acc_t>(), H, part[4]);
    std::copy_n(t[7].data_ptr<acc_t>(), E, part[5]);
    std::copy_n(t[2].data_ptr<acc_t>(), E, part[6]);
    std::copy_n(t[3].data_ptr<acc_t>(), E, part[7]);
    wp = part[0], w1 = part[1], w2 = part[2], bp = part[3], b1 = part[4], b2 = part[5], nw = part[6], nb = part[7];
  }
};

template <typename acc_t>
struct Args {
  const acc_t *y, *skip;
  int64_t ys, ss;  // row strides
  acc_t* out;      // (M, E) contiguous
  int64_t M, D, E, H, Ep, Hp;
  acc_t eps;
  const Weights<acc_t>* w;
  bool stream;  // write the output with streaming stores
};

// per-task scratch (in acc_t): x (kRows, Ep), normalised x (kRows, Ep), hidden (kRows, Hp), mlp out (kRows, Ep)
int64_t scratch_size(int64_t Ep, int64_t Hp) { return kRows * (3 * Ep + Hp); }

template <class I>
struct PostAttentionTask {
  template <typename acc_t>
  static T2T_INLINE void run(const Args<acc_t>* a, int64_t task, int64_t next, acc_t* s) {
    constexpr int L = Simd<acc_t, I::kBytes>::kLanes;
    const Args<acc_t>& c = *a;
    const Weights<acc_t>& w = *c.w;
    const int64_t r0 = task * kRows, n = std::min(kRows, c.M - r0), Ep = c.Ep, Hp = c.Hp, E = c.E;
    const int64_t full = E / L * L;  // columns in whole vectors; the rest one by one
    acc_t *x = s, *xn = x + kRows * Ep, *h = xn + kRows * Ep, *o = h + kRows * Hp;
    const acc_t* null = nullptr;
    // the next task's rows of y and skip are fetched into cache while this one computes (they are read once, from
    // memory: without this the row loads stall)
    Prefetcher pf;
    if (next * kRows < c.M) {
      pf.rows = std::min(kRows, c.M - next * kRows);
      pf.add(reinterpret_cast<const char*>(c.y + next * kRows * c.ys), c.ys * sizeof(acc_t), c.D * sizeof(acc_t));
      pf.add(reinterpret_cast<const char*>(c.skip + next * kRows * c.ss), c.ss * sizeof(acc_t), E * sizeof(acc_t));
      pf.plan(rows2_work<I, acc_t>(n, c.D, Ep) + rows2_work<I, acc_t>(n, E, Hp) + rows2_work<I, acc_t>(n, c.H, Ep));
    }

    // x = y Wp^T + bp + skip, xn = layer_norm(x): the products below read only the first E (H) columns of xn (h)
    gemm_rows2<I, Epilogue::kPlain>(c.y + r0 * c.ys, c.ys, n, c.D, w.wp, Ep, x, Ep, null, null, 0, pf);
    for (int64_t t = 0; t < n; ++t)
      add_skip_and_normalize<I>(x + t * Ep, c.skip + (r0 + t) * c.ss, w.bp, E, w.nw, w.nb, c.eps, xn + t * Ep);

    // h = gelu(xn W1^T + b1)
    gemm_rows2<I, Epilogue::kPlain>(xn, Ep, n, E, w.w1, Hp, h, Hp, null, null, 0, pf);
    const Gelu<acc_t, I::kBytes> gelu;
    for (int64_t t = 0; t < n; ++t) add_bias_gelu<I>(h + t * Hp, w.b1, c.H, gelu);

    // out = x + h W2^T + b2
    gemm_rows2<I, Epilogue::kPlain>(h, Hp, n, c.H, w.w2, Ep, o, Ep, null, null, 0, pf);
    // a large output is written past the caches (it would not stay there), when its rows are whole aligned vectors
    const bool stream = c.stream && full == E && (E * sizeof(acc_t)) % I::kBytes == 0 &&
                        reinterpret_cast<uintptr_t>(c.out) % I::kBytes == 0;
    for (int64_t t = 0; t < n; ++t) add_residual_row<I>(c.out + (r0 + t) * E, x + t * Ep, o + t * Ep, w.b2, E, stream);
  }
};

// Wide layers (the backbone's: weights of megabytes, which no row block keeps in cache) run the three products as
// whole-matrix GEMMs and fuse what lies between them.
constexpr int64_t kWideWeightBytes = int64_t(1) << 20;  // weights above this (about half an L2) take the wide path

// float32, where torch has oneDNN (onednn_linear.h): its fused linear with the bias, skip, GELU and residual in the
// products' epilogues, and ATen's LayerNorm between them:
//   x = y Wp^T + bp + skip;  h = gelu(layer_norm(x) W1^T + b1);  out = h W2^T + b2 + x.
bool onednn_wide_path(const at::Tensor& y) { return onednn_enabled_for(y) && linear_pointwise(true); }

at::Tensor post_attention_onednn(const at::Tensor& y, const at::Tensor& skip, const at::Tensor* p, double eps) {
  const at::Tensor x = onednn_linear_add(y, skip.contiguous(), p[0], p[1]);
  const at::Tensor xn = at::layer_norm(x, {x.size(1)}, p[2], p[3], eps);
  return onednn_linear_add(onednn_linear(xn, p[4], p[5], "gelu"), x, p[6], p[7]);
}

// Elsewhere (float64, torch without oneDNN): the products through ATen (MKL's packed kernels; our unpacked tiles reach
// 70-75% of them) and everything between them in three passes over rows:
//   (1) x = t + bp + skip and xn = layer_norm(x), t = y Wp^T already in out;
//   (2) h = gelu(h + b1) in place, h = xn W1^T;  (3) out = x + o + b2, o = h W2^T.
// Eager makes seven passes over these sizes for the same chain (bias copies, skip and residual adds, norm, GELU).
constexpr int64_t kWideRows = 16;  // rows per task of the passes

template <typename acc_t>
struct WideArgs {
  int pass;  // 1, 2, 3 as above
  const acc_t* skip;
  int64_t ss;  // skip's row stride
  acc_t *out, *xn, *h;  // out and xn (M, E), h (M, H), contiguous; xn holds o in pass 3
  int64_t M, E, H;
  const acc_t *bp, *b1, *b2, *nw, *nb;
  acc_t eps;
};

template <class I>
struct WidePassTask {
  template <typename acc_t>
  static T2T_INLINE void run(const WideArgs<acc_t>* a, int64_t task, int64_t, acc_t*) {
    const WideArgs<acc_t>& c = *a;
    const int64_t r0 = task * kWideRows, r1 = std::min(r0 + kWideRows, c.M), E = c.E;
    if (c.pass == 1) {
      for (int64_t r = r0; r < r1; ++r)
        add_skip_and_normalize<I>(c.out + r * E, c.skip + r * c.ss, c.bp, E, c.nw, c.nb, c.eps, c.xn + r * E);
    } else if (c.pass == 2) {
      const Gelu<acc_t, I::kBytes> gelu;
      for (int64_t r = r0; r < r1; ++r) add_bias_gelu<I>(c.h + r * c.H, c.b1, c.H, gelu);
    } else {
      for (int64_t r = r0; r < r1; ++r) add_residual_row<I>(c.out + r * E, c.out + r * E, c.xn + r * E, c.b2, E, false);
    }
  }
};

template <typename acc_t>
void post_attention_wide(const at::Tensor& y, const at::Tensor& skip, const at::Tensor* p, double eps, Isa isa,
                         at::Tensor& out) {
  const int64_t M = y.size(0), E = skip.size(1), H = p[4].size(0);
  at::Tensor xn = at::empty({M, E}, out.options()), h = at::empty({M, H}, out.options());
  WideArgs<acc_t> args{1, skip.data_ptr<acc_t>(), skip.stride(0), out.data_ptr<acc_t>(), xn.data_ptr<acc_t>(),
                       h.data_ptr<acc_t>(), M, E, H, p[1].data_ptr<acc_t>(), p[5].data_ptr<acc_t>(),
                       p[7].data_ptr<acc_t>(), p[2].data_ptr<acc_t>(), p[3].data_ptr<acc_t>(),
                       static_cast<acc_t>(eps)};
  auto run_pass = [&](int pass) {
    args.pass = pass;
    parallel_isa_tasks<WidePassTask>(isa, args, (M + kWideRows - 1) / kWideRows, 0);
  };
  at::mm_out(out, y, p[0].t());
  run_pass(1);
  at::mm_out(h, xn, p[4].t());
  run_pass(2);
  at::mm_out(xn, h, p[6].t());
  run_pass(3);
}

void check_inputs(const at::Tensor& y, const at::Tensor& skip, const at::Tensor* params) {
  static const char* names[] = {"proj_weight", "proj_bias", "norm_weight", "norm_bias",
                                "fc1_weight",  "fc1_bias",  "fc2_weight",  "fc2_bias"};
  TORCH_CHECK(y.dim() == 2 && skip.dim() == 2 && y.size(0) == skip.size(0),
              "post_attention (cpp): y must be (M, D) and skip (M, E), got y ", y.sizes(), " and skip ", skip.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "post_attention (cpp): y must be float32 or float64, got ", y.scalar_type());
  const int64_t D = y.size(1), E = skip.size(1), H = params[4].dim() == 2 ? params[4].size(0) : -1;
  const std::vector<int64_t> shapes[] = {{E, D}, {E}, {E}, {E}, {H, E}, {H}, {E, H}, {E}};
  for (int i = 0; i < 8; ++i) {
    TORCH_CHECK(params[i].sizes() == at::IntArrayRef(shapes[i]), "post_attention (cpp): ", names[i],
                " must have shape ", at::IntArrayRef(shapes[i]), ", got ", params[i].sizes());
  }
  for (const at::Tensor* t : {&y, &skip, params + 0, params + 1, params + 2, params + 3, params + 4, params + 5,
                              params + 6, params + 7}) {
    TORCH_CHECK(t->scalar_type() == y.scalar_type(), "post_attention (cpp): all tensors must have y's dtype ",
                y.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "post_attention (cpp): all tensors must be on the CPU, got ", t->device());
  }
}

at::Tensor post_attention_cpu(const at::Tensor& y_in, const at::Tensor& skip_in, const at::Tensor& proj_weight,
                              const at::Tensor& proj_bias, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                              const at::Tensor& fc1_weight, const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                              const at::Tensor& fc2_bias, double eps) {
  const at::Tensor raw[] = {proj_weight, proj_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                            fc2_bias};
  check_inputs(y_in, skip_in, raw);
  TORCH_CHECK(eps >= 0, "post_attention (cpp): eps must be non-negative, got ", eps);
  const at::Tensor y = y_in.stride(-1) == 1 ? y_in : y_in.contiguous();
  const at::Tensor skip = skip_in.stride(-1) == 1 ? skip_in : skip_in.contiguous();
  const int64_t M = y.size(0), D = y.size(1), E = skip.size(1), H = fc1_weight.size(0);
  const bool wide = (D * E + 2 * E * H) * static_cast<int64_t>(y.element_size()) > kWideWeightBytes;
  at::Tensor params[8];
  for (int i = 0; i < 8; ++i) params[i] = raw[i].contiguous();
  if (wide && M > 0 && E > 0 && onednn_wide_path(y)) return post_attention_onednn(y, skip, params, eps);
  at::Tensor out = at::empty({M, E}, skip.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || E == 0) return out;
  const Isa isa = cpu_isa();

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "post_attention_cpu", [&] {
    if (wide) return post_attention_wide<scalar_t>(y, skip, params, eps, isa, out);
    const int64_t Ep = padded_cols<scalar_t>(E), Hp = padded_cols<scalar_t>(H);
    const Weights<scalar_t> weights(params, D, E, H, Ep, Hp);
    const Args<scalar_t> args{y.data_ptr<scalar_t>(), skip.data_ptr<scalar_t>(), y.stride(0), skip.stride(0),
                              out.data_ptr<scalar_t>(), M, D, E, H, Ep, Hp, static_cast<scalar_t>(eps), &weights,
                              M * E * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes};
    parallel_isa_tasks<PostAttentionTask>(isa, args, (M + kRows - 1) / kRows, scratch_size(Ep, Hp));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, CPU, m) { m.impl("post_attention", &post_attention_cpu); }

}  // namespace t2t_kernels
