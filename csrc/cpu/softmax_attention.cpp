// CPU kernel of t2t_kernels::softmax_attention: multi-head softmax attention of a packed qkv, heads merged.
//
//   qkv (B, N, 3 H D) as nn.Linear writes it (q, k, v, then heads, then head_dim), out (B, N, H D):
//   out[b, i, h] = sum_j softmax_j(scale q[b, i, h] . k[b, j, h]) v[b, j, h]
//
// A task is one head of one image over a range of queries. It packs the head's keys transposed and scaled,
// K^T (D, Np), and its values, V (N, Dp), into per-thread scratch (zero-padded to whole register blocks), then takes
// kRows queries at a time through the whole chain in cache: S = Q K^T (read straight from qkv), the row softmax in
// place (max, exp, sum; vectorised), and out = S V / sum written straight into the merged-heads output. Nothing of
// size (N, N) reaches memory and q, k, v are read in place. At T2T-ViT-14's 197 tokens (B=8, 2-core CPU) it took
// 2.38 ms against 2.96 for torch's SDPA on the heads' views (the op bench, 2026-11-28). Every row is computed by one
// task in a fixed order, so the result does not depend on the number of threads. Math in the input dtype (float32
// or float64); bfloat16 (CPU autocast's qkv) in float32: the head's keys, values and each block of queries are
// widened into the scratch, the output rounded once on the way out.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>

#include "tiles.h"

namespace t2t_kernels {
namespace {

constexpr int64_t kRows = 64;  // queries per step: the (kRows, Np) scores stay in L1/L2 next to K^T and V

// keys rounded up to whole vectors (the widest instruction set's, so every set's divide it)
template <typename acc_t>
int64_t padded_keys(int64_t n) {
  constexpr int64_t lanes = IsaAvx512::kBytes / sizeof(acc_t);
  return (n + lanes - 1) / lanes * lanes;
}

template <typename acc_t>
struct Args {
  const acc_t* qkv;  // or, with bf16, the bfloat16 qkv (and out) in that dtype
  int64_t bs, ns;    // qkv's batch and token strides (its last stride is 1)
  acc_t* out;        // (B, N, H D) contiguous
  int64_t N, H, D, Np, Dp, chunks, chunk_rows, tasks;
  acc_t scale;
  bool bf16;
};

// per-task scratch (in acc_t): K^T (D, Np), V (N, Dp), scores (kRows, Np), row scales (kRows), output rows
// (kRows, Dp), and for bfloat16 input the head's keys (N, D) and a block of queries (kRows, D) widened
int64_t scratch_size(int64_t N, int64_t D, int64_t Np, int64_t Dp) {
  return D * Np + N * Dp + kRows * Np + kRows + kRows * Dp + N * D + kRows * D;
}

// rows (n, width) = x's n rows of D values (rows xs apart; bfloat16 widened to acc_t), zero from D to width
template <typename src_t, typename acc_t>
T2T_INLINE void pad_rows(const src_t* x, int64_t xs, int64_t n, int64_t D, acc_t* rows, int64_t width) {
  for (int64_t j = 0; j < n; ++j) {
    std::copy_n(x + j * xs, D, rows + j * width);
    std::fill(rows + j * width + D, rows + (j + 1) * width, acc_t(0));
  }
}

// kt (D, Np) = k (N, D)^T * scale, k rows ks apart; columns N..Np zero
template <class I, typename acc_t>
T2T_INLINE void pack_keys(const acc_t* k, int64_t ks, int64_t N, int64_t D, acc_t scale, acc_t* kt, int64_t Np) {
  constexpr int L = Simd<acc_t, I::kBytes>::kLanes;
  const int64_t full_n = N / L * L, full_d = D / L * L;
  for (int64_t j0 = 0; j0 < full_n; j0 += L) {
    for (int64_t d0 = 0; d0 < full_d; d0 += L) transpose_block<I>(k + j0 * ks + d0, ks, kt + d0 * Np + j0, Np, scale);
    for (int64_t j = j0; j < j0 + L; ++j)
      for (int64_t d = full_d; d < D; ++d) kt[d * Np + j] = k[j * ks + d] * scale;
  }
  for (int64_t j = full_n; j < N; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * Np + j] = k[j * ks + d] * scale;
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * Np + N, kt + (d + 1) * Np, acc_t(0));
}

// s[0, n) = exp(s - max(s)) in place, returns 1 / sum; s has whole vectors up to n rounded up (the padded keys),
// which the passes read whole, with the lanes past n at -inf (exp gives 0 there). A NaN in the row gives a NaN row,
// an all -inf row (every key masked off) NaN too (inf - inf), as torch's softmax.
template <class I, typename acc_t>
T2T_INLINE acc_t softmax_row(acc_t* s, int64_t n, const ScaledExp<acc_t, I::kBytes>& exp1) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  const int64_t full = n / L * L;
  const vec minus_inf = vec{} - std::numeric_limits<acc_t>::infinity();
  const vec tail = full < n ? lanes_below<acc_t, I::kBytes>(S::load(s + full), n - full, minus_inf) : minus_inf;
  // four running maxima, then halving: one chain of compares, vector after vector and then lane after lane, made
  // the max the op's slowest part after its products
  vec mx[4] = {tail, tail, tail, tail};
  int64_t j = 0;
  for (; j + 4 * L <= full; j += 4 * L) each_vector<4>([&](int u) { mx[u] = vmax(S::load(s + j + u * L), mx[u]); });
  for (; j < full; j += L) mx[0] = vmax(S::load(s + j), mx[0]);
  const vec mvec = vec{} + hmax<acc_t, I::kBytes>(vmax(vmax(mx[0], mx[1]), vmax(mx[2], mx[3])));
  // the exponentials four vectors at a time (each_vector), summed in order
  vec sum = vec{};
  for (j = 0; j + 4 * L <= full; j += 4 * L) {
    vec e[4];
    each_vector<4>([&](int u) { e[u] = exp1(S::load(s + j + u * L) - mvec); });
    each_vector<4>([&](int u) {
      S::store(s + j + u * L, e[u]);
      sum += e[u];
    });
  }
  for (; j < full; j += L) {
    const vec e = exp1(S::load(s + j) - mvec);
    S::store(s + j, e);
    sum += e;
  }
  if (full < n) {
    const vec e = exp1(tail - mvec);
    S::store(s + full, e);
    sum += e;
  }
  return acc_t(1) / hsum<acc_t, I::kBytes>(sum);
}

// one task: queries [q0, q1) of head h of image b
struct TaskRange {
  int64_t b, h, q0, q1;
};

template <typename acc_t>
TaskRange task_range(const Args<acc_t>& c, int64_t task) {
  const int64_t chunk = task % c.chunks, bh = task / c.chunks;
  return {bh / c.H, bh % c.H, chunk * c.chunk_rows, std::min(c.N, (chunk + 1) * c.chunk_rows)};
}

template <class I>
struct AttentionTask {
  template <typename acc_t>
  static T2T_INLINE void run(const Args<acc_t>* a, int64_t task, int64_t next, acc_t* scratch) {
    const Args<acc_t>& c = *a;
    const int64_t N = c.N, D = c.D, Np = c.Np, Dp = c.Dp, E = c.H * c.D;
    const TaskRange t = task_range(c, task);
    // the head's queries, its keys and values E and 2 E further, rows ns apart: q in acc_t, or qb in bfloat16
    const int64_t head = t.b * c.bs + t.h * D;
    const acc_t* q = c.bf16 ? nullptr : c.qkv + head;
    const auto* qb = c.bf16 ? reinterpret_cast<const c10::BFloat16*>(c.qkv) + head : nullptr;
    acc_t *kt = scratch, *vp = kt + D * Np, *s = vp + N * Dp, *rs = s + kRows * Np, *o = rs + kRows;
    acc_t *kw = o + kRows * Dp, *qw = kw + N * D;  // bfloat16 input: keys and a block of queries in acc_t

    // the next head's q, k and v rows are fetched into cache while this one computes: a head's rows are 3 E apart
    // in qkv, further than the hardware prefetchers follow, and each row is read once from memory (or L3)
    Prefetcher pf;
    constexpr int64_t wide = I::C1 * Simd<acc_t, I::kBytes>::kLanes;  // S in tiles of C1 vectors, then one vector
    const int64_t Nw = Np / wide * wide, blocks = (t.q1 - t.q0 + kRows - 1) / kRows;
    if (next < c.tasks) {
      const TaskRange u = task_range(c, next);
      if (u.b != t.b || u.h != t.h) {
        const int64_t bytes = c.bf16 ? sizeof(c10::BFloat16) : sizeof(acc_t);
        const char* nq = reinterpret_cast<const char*>(c.qkv) + (u.b * c.bs + u.h * D) * bytes;
        const int64_t row = c.ns * bytes, width = D * bytes;
        pf.rows = N;
        for (int part = 0; part < 3; ++part) pf.add(nq + part * E * bytes, row, width);
        pf.plan(blocks * (tiles_work<I, I::R1, I::C1, acc_t>(kRows, D, Nw) +
                          tiles_work<I, I::R1, 1, acc_t>(kRows, D, Np - Nw) + rows2_work<I, acc_t>(kRows, N, Dp)));
      }
    }

    // K^T scaled (scale * q.k is then a plain product) and V, zero-padded: padded keys score 0 and the softmax and
    // the second product skip them; padded value columns give output columns that are dropped
    if (!c.bf16) {
      pack_keys<I>(q + E, c.ns, N, D, c.scale, kt, Np);
      pad_rows(q + 2 * E, c.ns, N, D, vp, Dp);
    } else if constexpr (std::is_same_v<acc_t, float>) {
      pad_rows(qb + E, c.ns, N, D, kw, D);
      pack_keys<I>(kw, D, N, D, c.scale, kt, Np);
      pad_rows(qb + 2 * E, c.ns, N, D, vp, Dp);
    }

    const ScaledExp<acc_t, I::kBytes> exp1{acc_t(1)};
    const acc_t* none = nullptr;
    for (int64_t r0 = t.q0; r0 < t.q1; r0 += kRows) {
      const int64_t n = std::min(kRows, t.q1 - r0);
      const acc_t* qr = qw;  // the block's queries: in place, or widened into qw
      int64_t qs = D;
      if (!c.bf16) {
        qr = q + r0 * c.ns, qs = c.ns;
      } else if constexpr (std::is_same_v<acc_t, float>) {
        pad_rows(qb + r0 * c.ns, c.ns, n, D, qw, D);
      }
      gemm_tiles<I, I::R1, I::C1, Epilogue::kPlain>(qr, qs, n, D, kt, Np, Nw, s, Np, none, none, 0, pf, false);
      if (Nw < Np)
        gemm_tiles<I, I::R1, 1, Epilogue::kPlain>(qr, qs, n, D, kt + Nw, Np, Np - Nw, s + Nw, Np, none, none, 0, pf,
                                                  false);
      for (int64_t i = 0; i < n; ++i) rs[i] = softmax_row<I>(s + i * Np, N, exp1);
      // the output rows straight into the merged heads when they are whole register blocks, else through o
      const int64_t first = (t.b * N + r0) * E + t.h * D;
      const bool direct = Dp == D && !c.bf16;
      gemm_tiles<I, I::R2, I::C2, Epilogue::kScaleRows>(s, Np, n, N, vp, Dp, Dp, direct ? c.out + first : o,
                                                        direct ? E : Dp, rs, none, 0, pf, false);
      if (c.bf16) {
        auto* dst = reinterpret_cast<c10::BFloat16*>(c.out) + first;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t d = 0; d < D; ++d) dst[i * E + d] = c10::BFloat16(o[i * Dp + d]);
      } else if (!direct) {
        for (int64_t i = 0; i < n; ++i) std::copy_n(o + i * Dp, D, c.out + first + i * E);
      }
    }
  }
};

// ---- backward ------------------------------------------------------------------------------------------------
// grad_qkv (B, N, 3 E) from grad_out dO (B, N, E) and qkv, one head of one image per task, with P = softmax(S),
// S = scale Q K^T recomputed:
//   dV = P^T dO,  dP = dO V^T,  dS = scale P (dP - rowsum(P dP)),  dQ = dS K,  dK = dS^T Q
// (rowsum(P dP) is the row's dO . O: no output or log-sum-exp saved). The head's P and dS, (N, Np) each, stay in the
// task's scratch next to its packed K^T, V^T and the zero-padded rows of K, Q and dO: about 0.6 MB at 197 tokens
// (the callers keep N small: softmax_attention's BACKWARD_MAX_TOKENS). Sums in a fixed order per head: the result
// does not depend on the number of threads.
template <typename acc_t>
struct BackwardArgs {
  const acc_t* qkv;
  int64_t bs, ns;  // qkv's batch and token strides (its last stride is 1)
  const acc_t* grad_out;
  int64_t gbs, gns;  // grad_out's batch and token strides (its last stride is 1)
  acc_t* grad_qkv;   // (B, N, 3 E) contiguous
  int64_t B, N, H, D, Np, Dp;
  acc_t scale;
};

// K^T scaled and V^T (D, Np); K, Q, dO rows (N, Dp); P and dS (N, Np); a product's result (Np, Dp)
int64_t backward_scratch_size(int64_t N, int64_t D, int64_t Np, int64_t Dp) {
  return 2 * D * Np + 3 * N * Dp + 2 * N * Np + Np * Dp;
}

// x's N rows of D values (rows xs apart) <- rows (N, Dp)
template <typename acc_t>
T2T_INLINE void unpad_rows(const acc_t* rows, int64_t Dp, int64_t N, int64_t D, acc_t* x, int64_t xs) {
  for (int64_t j = 0; j < N; ++j) std::copy_n(rows + j * Dp, D, x + j * xs);
}

// result (N, Np) = rows (N, D; Dp apart) packed (D, Np): the whole register blocks, then the last vectors
template <class I, typename acc_t>
T2T_INLINE void times_packed(const acc_t* rows, int64_t N, int64_t D, int64_t Dp, const acc_t* packed, int64_t Np,
                             acc_t* result, Prefetcher& pf) {
  constexpr int64_t wide = I::C1 * Simd<acc_t, I::kBytes>::kLanes;
  const int64_t Nw = Np / wide * wide;
  const acc_t* none = nullptr;
  gemm_tiles<I, I::R1, I::C1, Epilogue::kPlain>(rows, Dp, N, D, packed, Np, Nw, result, Np, none, none, 0, pf, false);
  if (Nw < Np)
    gemm_tiles<I, I::R1, 1, Epilogue::kPlain>(rows, Dp, N, D, packed + Nw, Np, Np - Nw, result + Nw, Np, none, none,
                                              0, pf, false);
}

template <class I>
struct AttentionBackwardTask {
  template <typename acc_t>
  static T2T_INLINE void run(const BackwardArgs<acc_t>* a, int64_t task, int64_t next, acc_t* scratch) {
    using S = Simd<acc_t, I::kBytes>;
    using vec = typename S::vec;
    constexpr int L = S::kLanes;
    const BackwardArgs<acc_t>& c = *a;
    const int64_t N = c.N, D = c.D, Np = c.Np, Dp = c.Dp, E = c.H * D, b = task / c.H, h = task % c.H;
    const acc_t* q = c.qkv + b * c.bs + h * D;  // k and v: E and 2 E further
    const acc_t* go = c.grad_out + b * c.gbs + h * D;
    acc_t *kt = scratch, *vt = kt + D * Np, *kp = vt + D * Np, *qp = kp + N * Dp, *gp = qp + N * Dp;
    acc_t *P = gp + N * Dp, *dS = P + N * Np, *out = dS + N * Np;
    const acc_t* none = nullptr;
    // the next head's q, k, v and dO rows are fetched into cache while this one computes (as in the forward)
    Prefetcher ahead;
    if (next < c.B * c.H) {
      const int64_t nb = next / c.H, nh = next % c.H;
      const char* nq = reinterpret_cast<const char*>(c.qkv + nb * c.bs + nh * D);
      const int64_t row = c.ns * sizeof(acc_t), width = D * sizeof(acc_t);
      ahead.rows = N;
      for (int part = 0; part < 3; ++part) ahead.add(nq + part * E * sizeof(acc_t), row, width);
      ahead.add(reinterpret_cast<const char*>(c.grad_out + nb * c.gbs + nh * D), c.gns * sizeof(acc_t), width);
      constexpr int64_t wide = I::C1 * L;
      const int64_t Nw = Np / wide * wide;
      ahead.plan(2 * (tiles_work<I, I::R1, I::C1, acc_t>(N, D, Nw) + tiles_work<I, I::R1, 1, acc_t>(N, D, Np - Nw)) +
                 rows2_work<I, acc_t>(N, N, Dp) + 2 * reduce_work<I, acc_t>(N, Np, Dp));
    }

    pack_keys<I>(q + E, c.ns, N, D, c.scale, kt, Np);
    pack_keys<I>(q + 2 * E, c.ns, N, D, acc_t(1), vt, Np);
    pad_rows(q + E, c.ns, N, D, kp, Dp);
    pad_rows(q, c.ns, N, D, qp, Dp);
    pad_rows(go, c.gns, N, D, gp, Dp);

    // S = Q K^T scale, then P = softmax(S) row by row (columns N..Np zero); dP = dO V^T (zero there too)
    times_packed<I>(qp, N, D, Dp, kt, Np, P, ahead);
    times_packed<I>(gp, N, D, Dp, vt, Np, dS, ahead);
    const ScaledExp<acc_t, I::kBytes> exp1{acc_t(1)};
    for (int64_t i = 0; i < N; ++i) {
      acc_t *p = P + i * Np, *ds = dS + i * Np;
      const vec inv = vec{} + softmax_row<I>(p, N, exp1);
      std::fill(p + N, p + Np, acc_t(0));
      vec dot = vec{};
      for (int64_t j = 0; j < Np; j += L) {
        const vec pj = S::load(p + j) * inv;
        S::store(p + j, pj);
        dot += pj * S::load(ds + j);
      }
      const vec d = vec{} + hsum<acc_t, I::kBytes>(dot), scale = vec{} + c.scale;
      for (int64_t j = 0; j < Np; j += L) S::store(ds + j, scale * S::load(p + j) * (S::load(ds + j) - d));
    }

    // dQ = dS K, dK = dS^T Q, dV = P^T dO, each through `out` into the head's columns of grad_qkv
    // (plain loops and always-inline helpers only: a lambda here would not be built for the task's instruction set)
    acc_t* g = c.grad_qkv + b * N * 3 * E + h * D;
    gemm_tiles<I, I::R2, I::C2, Epilogue::kPlain>(dS, Np, N, N, kp, Dp, Dp, out, Dp, none, none, 0, ahead, false);
    unpad_rows(out, Dp, N, D, g, 3 * E);
    gemm_reduce<I>(dS, Np, qp, Dp, N, Np, Dp, out, ahead);
    unpad_rows(out, Dp, N, D, g + E, 3 * E);
    gemm_reduce<I>(P, Np, gp, Dp, N, Np, Dp, out, ahead);
    unpad_rows(out, Dp, N, D, g + 2 * E, 3 * E);
  }
};

at::Tensor softmax_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& qkv_in, int64_t num_heads,
                                          double scale) {
  TORCH_CHECK(qkv_in.dim() == 3 && num_heads > 0 && qkv_in.size(2) % (3 * num_heads) == 0,
              "softmax_attention_backward (cpp): qkv must be (B, N, 3*num_heads*head_dim), got ", qkv_in.sizes(),
              " with num_heads=", num_heads);
  TORCH_CHECK(qkv_in.scalar_type() == at::kFloat || qkv_in.scalar_type() == at::kDouble,
              "softmax_attention_backward (cpp): qkv must be float32 or float64, got ", qkv_in.scalar_type());
  TORCH_CHECK(qkv_in.device().is_cpu() && grad_out_in.device().is_cpu(),
              "softmax_attention_backward (cpp): qkv and grad_out must be on the CPU, got ", qkv_in.device(), " and ",
              grad_out_in.device());
  const int64_t B = qkv_in.size(0), N = qkv_in.size(1), E = qkv_in.size(2) / 3, D = E / num_heads;
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({B, N, E}) && grad_out_in.scalar_type() == qkv_in.scalar_type(),
              "softmax_attention_backward (cpp): grad_out must be (B, N, num_heads*head_dim) = (", B, ", ", N, ", ",
              E, ") in ", qkv_in.scalar_type(), ", got ", grad_out_in.sizes(), " ", grad_out_in.scalar_type());
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.stride(2) == 1 ? grad_out_in : grad_out_in.contiguous();
  at::Tensor grad_qkv = at::empty({B, N, 3 * E}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_qkv.numel() == 0) return grad_qkv;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "softmax_attention_backward_cpu", [&] {
    const int64_t Np = padded_keys<scalar_t>(N), Dp = padded_cols<scalar_t>(D);
    const BackwardArgs<scalar_t> args{qkv.const_data_ptr<scalar_t>(), qkv.stride(0), qkv.stride(1),
                                      grad_out.const_data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1),
                                      grad_qkv.mutable_data_ptr<scalar_t>(), B, N, num_heads, D, Np, Dp,
                                      static_cast<scalar_t>(scale)};
    parallel_isa_tasks<AttentionBackwardTask>(cpu_isa(), args, B * num_heads, backward_scratch_size(N, D, Np, Dp));
  });
  return grad_qkv;
}

at::Tensor softmax_attention_cpu(const at::Tensor& qkv_in, int64_t num_heads, double scale) {
  TORCH_CHECK(qkv_in.dim() == 3, "softmax_attention (cpp): qkv must be (B, N, 3*num_heads*head_dim), got ",
              qkv_in.sizes());
  TORCH_CHECK(qkv_in.scalar_type() == at::kFloat || qkv_in.scalar_type() == at::kDouble ||
                  qkv_in.scalar_type() == at::kBFloat16,
              "softmax_attention (cpp): qkv must be float32, float64 or bfloat16, got ", qkv_in.scalar_type());
  TORCH_CHECK(qkv_in.device().is_cpu(), "softmax_attention (cpp): qkv must be on the CPU, got ", qkv_in.device());
  TORCH_CHECK(num_heads > 0 && qkv_in.size(2) % (3 * num_heads) == 0,
              "softmax_attention (cpp): qkv's last dim must be 3*num_heads*head_dim, got qkv ", qkv_in.sizes(),
              " and num_heads=", num_heads);
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / (3 * num_heads), E = num_heads * D;
  at::Tensor out = at::empty({B, N, E}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "softmax_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t Np = padded_keys<acc_t>(N), Dp = padded_cols<acc_t>(D);
    // split each head's queries into chunks (whole kRows blocks) only when there are fewer heads than about four
    // per thread: each chunk packs the head's K and V again
    const int64_t heads = B * num_heads, blocks = (N + kRows - 1) / kRows;
    const int64_t wanted = std::max<int64_t>(1, (4 * at::get_num_threads() + heads - 1) / heads);
    const int64_t chunk_blocks = (blocks + std::min(blocks, wanted) - 1) / std::min(blocks, wanted);
    const int64_t chunks = (blocks + chunk_blocks - 1) / chunk_blocks;  // every chunk has rows
    const Args<acc_t> args{static_cast<const acc_t*>(qkv.const_data_ptr()), qkv.stride(0), qkv.stride(1),
                           static_cast<acc_t*>(out.mutable_data_ptr()), N, num_heads, D, Np, Dp, chunks,
                           chunk_blocks * kRows, heads * chunks, static_cast<acc_t>(scale),
                           std::is_same_v<scalar_t, c10::BFloat16>};
    parallel_isa_tasks<AttentionTask>(cpu_isa(), args, args.tasks, scratch_size(N, D, Np, Dp));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, CPU, m) {
  m.impl("softmax_attention", &softmax_attention_cpu);
  m.impl("softmax_attention_backward", &softmax_attention_backward_cpu);
}

}  // namespace t2t_kernels
