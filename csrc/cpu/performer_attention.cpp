// CPU kernels of t2t_kernels::performer_attention and its backward (DESIGN §4).
//
// Every pass walks (batch, chunk of kChunk rows) tasks with at::parallel_for. A task computes the features
// phi(x) of its rows into a small scratch tile (never a (B, T, m) tensor); reductions over T write one partial per
// task and are summed in chunk order afterwards, so results do not depend on the number of threads.
// Math runs in fp32 (fp64 for fp64 inputs); the hot tile loops get an AVX2+FMA clone picked at load time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define T2T_INLINE inline __attribute__((always_inline))

namespace t2t_kernels {
namespace {

constexpr int64_t kChunk = 128;  // rows per task; fixed, so the order of the sums over T is fixed

// Fixed-width vectors (GCC/Clang vector extensions): the compiler keeps them in registers, which it does not do
// for a plain accumulator array, and lowers them to whatever SIMD the function is compiled for.
template <typename acc_t>
struct Simd {
  typedef acc_t vec __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 32 / sizeof(acc_t);
  static T2T_INLINE vec load(const acc_t* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static T2T_INLINE void store(acc_t* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
};
typedef int32_t int32x8 __attribute__((vector_size(32)));

// exp of 8 floats: Cephes expf polynomial (~1 ulp); std::exp does not vectorise without -ffast-math.
T2T_INLINE Simd<float>::vec exp_approx(Simd<float>::vec x) {
  using vec = Simd<float>::vec;
  const vec lo = vec{} - 87.0f, hi = vec{} + 88.0f;
  const vec clamped = x < lo ? lo : (x > hi ? hi : x);
  const vec magic = vec{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vec k = (clamped * 1.44269504088896341f + magic) - magic;
  const vec r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
  vec p = vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vec e = p * r * r + r + 1.0f;
  const int32x8 bits = (__builtin_convertvector(k, int32x8) + 127) << 23;
  vec two_to_k;
  std::memcpy(&two_to_k, &bits, sizeof(two_to_k));
  return x < lo ? vec{} : e * two_to_k;
}

// x[i] = exp(x[i] + shift) * scale for i < n
T2T_INLINE void exp_shift_scale(float* x, int64_t n, float shift, float scale) {
  using S = Simd<float>;
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) S::store(x + i, exp_approx(S::load(x + i) + shift) * scale);
  if (i < n) {  // the tail through one zero-padded vector
    float tail[S::kLanes] = {};
    std::copy(x + i, x + n, tail);
    S::store(tail, exp_approx(S::load(tail) + shift) * scale);
    std::copy(tail, tail + (n - i), x + i);
  }
}
T2T_INLINE void exp_shift_scale(double* x, int64_t n, double shift, double scale) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] + shift) * scale;
}

// out[0:c] = x[0:r] M for row-major M (r, c). Columns go in blocks of kCols held in registers across the sum over
// r (the shapes here have c = 32 or 64); leftover columns take a plain dot product.
constexpr int64_t kCols = 32;
template <typename acc_t>
T2T_INLINE void row_times_matrix(const acc_t* x, const acc_t* M, int64_t r, int64_t c, acc_t* out) {
  using S = Simd<acc_t>;
  constexpr int64_t kVecs = kCols / S::kLanes;
  int64_t c0 = 0;
  for (; c0 + kCols <= c; c0 += kCols) {
    typename S::vec acc[kVecs] = {};
    for (int64_t j = 0; j < r; ++j) {
      const acc_t* mj = M + j * c + c0;
      for (int64_t v = 0; v < kVecs; ++v) acc[v] += x[j] * S::load(mj + v * S::kLanes);
    }
    for (int64_t v = 0; v < kVecs; ++v) S::store(out + c0 + v * S::kLanes, acc[v]);
  }
  for (; c0 < c; ++c0) {
    acc_t acc = 0;
    for (int64_t j = 0; j < r; ++j) acc += x[j] * M[j * c + c0];
    out[c0] = acc;
  }
}

template <typename acc_t>
T2T_INLINE acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// phi (n, m) = exp(x wt - |x|^2 / 2) * scale for the rows of x (n, E); wt is w transposed (E, m).
template <typename acc_t>
T2T_INLINE void features_impl(const acc_t* x, int64_t n, int64_t E, int64_t m, const acc_t* wt, acc_t scale,
                              acc_t* phi) {
  for (int64_t t = 0; t < n; ++t) {
    const acc_t* xr = x + t * E;
    acc_t* pr = phi + t * m;
    row_times_matrix(xr, wt, E, m, pr);
    exp_shift_scale(pr, m, -acc_t(0.5) * dot(xr, xr, E), scale);
  }
}

// out (n, c) = a (n, r) b (r, c), all row-major.
template <typename acc_t>
T2T_INLINE void gemm_nn_impl(const acc_t* a, const acc_t* b, int64_t n, int64_t r, int64_t c, acc_t* out) {
  for (int64_t t = 0; t < n; ++t) row_times_matrix(a + t * r, b, r, c, out + t * c);
}

// out (r, c) += a (n, r)^T b (n, c): a partial sum over the n rows of a chunk, c in register blocks as above.
template <typename acc_t>
T2T_INLINE void gemm_tn_impl(const acc_t* a, const acc_t* b, int64_t n, int64_t r, int64_t c, acc_t* out) {
  using S = Simd<acc_t>;
  constexpr int64_t kVecs = kCols / S::kLanes;
  for (int64_t j = 0; j < r; ++j) {
    int64_t c0 = 0;
    for (; c0 + kCols <= c; c0 += kCols) {
      typename S::vec acc[kVecs] = {};
      for (int64_t t = 0; t < n; ++t) {
        const acc_t* bt = b + t * c + c0;
        for (int64_t v = 0; v < kVecs; ++v) acc[v] += a[t * r + j] * S::load(bt + v * S::kLanes);
      }
      for (int64_t v = 0; v < kVecs; ++v) {
        acc_t* o = out + j * c + c0 + v * S::kLanes;
        S::store(o, S::load(o) + acc[v]);
      }
    }
    for (; c0 < c; ++c0) {
      acc_t acc = 0;
      for (int64_t t = 0; t < n; ++t) acc += a[t * r + j] * b[t * c + c0];
      out[j * c + c0] += acc;
    }
  }
}

// gx (n, E) = (G * P) w - x * rowsum(G * P), the gradient through phi; G is overwritten with G * P.
template <typename acc_t>
T2T_INLINE void feature_grad_impl(acc_t* G, const acc_t* P, const acc_t* x, const acc_t* w, int64_t n, int64_t E,
                                  int64_t m, acc_t* gx) {
  for (int64_t t = 0; t < n; ++t) {
    acc_t* gr = G + t * m;
    const acc_t* pr = P + t * m;
    for (int64_t j = 0; j < m; ++j) gr[j] *= pr[j];
    acc_t rowsum = 0;
#pragma omp simd reduction(+ : rowsum)
    for (int64_t j = 0; j < m; ++j) rowsum += gr[j];
    acc_t* o = gx + t * E;
    const acc_t* xr = x + t * E;
    row_times_matrix(gr, w, m, E, o);
    for (int64_t e = 0; e < E; ++e) o[e] -= xr[e] * rowsum;
  }
}

// The float versions run an AVX2+FMA build of the loops when the CPU has it (checked once); fp64 is the checking
// path and stays plain. (target_clones("arch=haswell") would test the CPU model, not its features.)
#if defined(__GNUC__) && defined(__x86_64__)
#define T2T_AVX2 __attribute__((target("avx2,fma")))
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#define T2T_FLOAT_KERNEL(name, params, args)            \
  T2T_AVX2 void name##_avx2 params { name##_impl args; } \
  void name##_plain params { name##_impl args; }          \
  void name params {                                      \
    if (cpu_has_avx2())                                   \
      name##_avx2 args;                                   \
    else                                                  \
      name##_plain args;                                  \
  }
#else
#define T2T_FLOAT_KERNEL(name, params, args) \
  void name params { name##_impl args; }
#endif

T2T_FLOAT_KERNEL(features,
                 (const float* x, int64_t n, int64_t E, int64_t m, const float* wt, float scale, float* phi),
                 (x, n, E, m, wt, scale, phi))
T2T_FLOAT_KERNEL(gemm_nn, (const float* a, const float* b, int64_t n, int64_t r, int64_t c, float* out),
                 (a, b, n, r, c, out))
T2T_FLOAT_KERNEL(gemm_tn, (const float* a, const float* b, int64_t n, int64_t r, int64_t c, float* out),
                 (a, b, n, r, c, out))
T2T_FLOAT_KERNEL(feature_grad,
                 (float* G, const float* P, const float* x, const float* w, int64_t n, int64_t E, int64_t m, float* gx),
                 (G, P, x, w, n, E, m, gx))
void features(const double* x, int64_t n, int64_t E, int64_t m, const double* wt, double scale, double* phi) {
  features_impl(x, n, E, m, wt, scale, phi);
}
void gemm_nn(const double* a, const double* b, int64_t n, int64_t r, int64_t c, double* out) {
  gemm_nn_impl(a, b, n, r, c, out);
}
void gemm_tn(const double* a, const double* b, int64_t n, int64_t r, int64_t c, double* out) {
  gemm_tn_impl(a, b, n, r, c, out);
}
void feature_grad(double* G, const double* P, const double* x, const double* w, int64_t n, int64_t E, int64_t m,
                  double* gx) {
  feature_grad_impl(G, P, x, w, n, E, m, gx);
}

// Rows [t0, t0 + n) of one batch element of x (B, T, E), unit last stride, converted to acc_t (n, E).
template <typename scalar_t, typename acc_t>
void load_rows(const at::Tensor& x, int64_t b, int64_t t0, int64_t n, acc_t* out) {
  const int64_t E = x.size(2);
  const scalar_t* base = x.data_ptr<scalar_t>() + b * x.stride(0) + t0 * x.stride(1);
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* row = base + t * x.stride(1);
    for (int64_t e = 0; e < E; ++e) out[t * E + e] = static_cast<acc_t>(row[e]);
  }
}

template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* tile, int64_t n, at::Tensor& out, int64_t b, int64_t t0) {
  const int64_t E = out.size(2);
  scalar_t* dst = out.data_ptr<scalar_t>() + (b * out.size(1) + t0) * E;  // out is contiguous
  for (int64_t i = 0; i < n * E; ++i) dst[i] = static_cast<scalar_t>(tile[i]);
}

int64_t num_chunks(int64_t T) { return (T + kChunk - 1) / kChunk; }

// Runs task(b, t0, n, chunk_index, scratch) for every (batch, chunk) in parallel; scratch is per-thread.
template <typename acc_t, typename Task>
void for_each_chunk(int64_t B, int64_t T, int64_t scratch_size, const Task& task) {
  const int64_t chunks = num_chunks(T);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_size);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, c = i % chunks;
      const int64_t t0 = c * kChunk;
      task(b, t0, std::min(kChunk, T - t0), c, scratch.data());
    }
  });
}

// partials (B, chunks, size) -> out (B, size), summed in chunk order.
template <typename acc_t>
void sum_partials(const std::vector<acc_t>& partials, int64_t B, int64_t chunks, int64_t size, acc_t* out) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* o = out + b * size;
      std::fill(o, o + size, acc_t(0));
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t* p = partials.data() + (b * chunks + c) * size;
        for (int64_t i = 0; i < size; ++i) o[i] += p[i];
      }
    }
  });
}

// B matrices (r, c), batch_stride apart -> (B, c, r) contiguous
template <typename acc_t>
std::vector<acc_t> transposed(const acc_t* x, int64_t B, int64_t batch_stride, int64_t r, int64_t c) {
  std::vector<acc_t> out(B * r * c);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) out[(b * c + j) * r + i] = x[b * batch_stride + i * c + j];
  return out;
}

struct Weights {  // w in the accumulation dtype, as (m, E) and transposed (E, m)
  at::Tensor w, wt;
};

Weights accumulation_weights(const at::Tensor& w, at::ScalarType acc) {
  return {w.to(acc).contiguous(), w.to(acc).t().contiguous()};
}

at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, double eps) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}, {"w", w}}) {
    TORCH_CHECK(t.device().is_cpu(), "performer_attention (cpp): ", name, " must be a CPU tensor, got ", t.device());
  }
  TORCH_CHECK(q.dim() == 3, "performer_attention (cpp): q must be (B, T, E), got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "performer_attention (cpp): q, k, v must have the same shape, got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "performer_attention (cpp): q, k, v must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype,
              "performer_attention (cpp): q, k, v must share a dtype, got ", dtype, ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == q.size(2) && w.size(0) >= 1,
              "performer_attention (cpp): w must be (m, E) with E = ", q.size(2), " (the width of q), got shape ",
              w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "performer_attention (cpp): w must be floating point, got ",
              w.scalar_type());
  TORCH_CHECK(eps > 0, "performer_attention (cpp): eps must be positive, got ", eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                       const at::Tensor& v_in, const at::Tensor& w_in,
                                                                       double eps) {
  check_inputs(q_in, k_in, v_in, w_in, eps);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t B = q.size(0), T = q.size(1), E = q.size(2), m = w_in.size(0);
  const auto acc = accumulation_dtype(q.scalar_type());
  const Weights weights = accumulation_weights(w_in, acc);
  at::Tensor y = at::empty({B, T, E}, q.options());
  at::Tensor kv_state = at::empty({B, m, E}, q.options().dtype(acc));
  at::Tensor k_sum = at::empty({B, m}, q.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "performer_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* wt = weights.wt.data_ptr<acc_t>();
    const acc_t scale = acc_t(1) / std::sqrt(acc_t(m));
    const int64_t chunks = num_chunks(T), state_size = m * E + m;

    // pass 1: per-chunk partials of [phi(k)^T v | sum_t phi(k)], then their sum in chunk order
    std::vector<acc_t> partials(B * chunks * state_size);
    for_each_chunk<acc_t>(B, T, kChunk * (2 * E + m), [&](int64_t b, int64_t t0, int64_t n, int64_t c, acc_t* s) {
      acc_t *xk = s, *xv = s + kChunk * E, *phi = s + 2 * kChunk * E;
      load_rows<scalar_t>(k, b, t0, n, xk);
      load_rows<scalar_t>(v, b, t0, n, xv);
      features(xk, n, E, m, wt, scale, phi);
      acc_t* part = partials.data() + (b * chunks + c) * state_size;
      std::fill(part, part + state_size, acc_t(0));
      gemm_tn(phi, xv, n, m, E, part);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < m; ++j) part[m * E + j] += phi[t * m + j];
    });
    std::vector<acc_t> state(B * state_size);
    sum_partials(partials, B, chunks, state_size, state.data());
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(state.data() + b * state_size, m * E, kv_state.data_ptr<acc_t>() + b * m * E);
      std::copy_n(state.data() + b * state_size + m * E, m, k_sum.data_ptr<acc_t>() + b * m);
    }

    // pass 2: y = phi(q) A / (phi(q) s + eps), per chunk
    for_each_chunk<acc_t>(B, T, kChunk * (2 * E + m), [&](int64_t b, int64_t t0, int64_t n, int64_t, acc_t* s) {
      acc_t *xq = s, *num = s + kChunk * E, *phi = s + 2 * kChunk * E;
      const acc_t* A = state.data() + b * state_size;
      const acc_t* ksum = A + m * E;
      load_rows<scalar_t>(q, b, t0, n, xq);
      features(xq, n, E, m, wt, scale, phi);
      gemm_nn(phi, A, n, m, E, num);
      for (int64_t t = 0; t < n; ++t) {
        const acc_t inv = acc_t(1) / (dot(phi + t * m, ksum, m) + acc_t(eps));
        for (int64_t e = 0; e < E; ++e) num[t * E + e] *= inv;
      }
      store_rows<scalar_t>(num, n, y, b, t0);
    });
  });
  return {y, kv_state, k_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_attention_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& w_in, const at::Tensor& kv_state_in, const at::Tensor& k_sum_in, double eps) {
  check_inputs(q_in, k_in, v_in, w_in, eps);
  const int64_t B = q_in.size(0), T = q_in.size(1), E = q_in.size(2), m = w_in.size(0);
  const auto acc = accumulation_dtype(q_in.scalar_type());
  TORCH_CHECK(grad_y_in.sizes() == q_in.sizes() && grad_y_in.scalar_type() == q_in.scalar_type() &&
                  grad_y_in.device().is_cpu(),
              "performer_attention_backward (cpp): grad_y must be a CPU tensor of q's shape ", q_in.sizes(),
              " and dtype ", q_in.scalar_type(), ", got ", grad_y_in.sizes(), " ", grad_y_in.scalar_type());
  TORCH_CHECK(kv_state_in.sizes() == at::IntArrayRef({B, m, E}) && kv_state_in.scalar_type() == acc,
              "performer_attention_backward (cpp): kv_state must be (B, m, E) = (", B, ", ", m, ", ", E, ") in ",
              acc, ", got ", kv_state_in.sizes(), " ", kv_state_in.scalar_type());
  TORCH_CHECK(k_sum_in.sizes() == at::IntArrayRef({B, m}) && k_sum_in.scalar_type() == acc,
              "performer_attention_backward (cpp): k_sum must be (B, m) = (", B, ", ", m, ") in ", acc, ", got ",
              k_sum_in.sizes(), " ", k_sum_in.scalar_type());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor grad_y = unit_last_stride(grad_y_in);
  const at::Tensor kv_state = kv_state_in.contiguous(), k_sum = k_sum_in.contiguous();
  const Weights weights = accumulation_weights(w_in, acc);
  at::Tensor gq = at::empty({B, T, E}, q.options());
  at::Tensor gk = at::empty({B, T, E}, q.options());
  at::Tensor gv = at::empty({B, T, E}, q.options());

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "performer_attention_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t *w = weights.w.data_ptr<acc_t>(), *wt = weights.wt.data_ptr<acc_t>();
    const acc_t* A = kv_state.data_ptr<acc_t>();
    const acc_t* ksum = k_sum.data_ptr<acc_t>();
    const acc_t scale = acc_t(1) / std::sqrt(acc_t(m));
    const std::vector<acc_t> At = transposed(A, B, m * E, m, E);  // (B, E, m)
    const int64_t chunks = num_chunks(T), state_size = m * E + m;

    // pass 1: gq per chunk, and per-chunk partials of [gA = phi(q)^T gn | gs = phi(q)^T gd]
    std::vector<acc_t> partials(B * chunks * state_size);
    const int64_t scratch1 = kChunk * (4 * E + 2 * m + 1);
    for_each_chunk<acc_t>(B, T, scratch1, [&](int64_t b, int64_t t0, int64_t n, int64_t c, acc_t* s) {
      acc_t *xq = s, *g = xq + kChunk * E, *num = g + kChunk * E, *gx = num + kChunk * E;
      acc_t *phi = gx + kChunk * E, *gphi = phi + kChunk * m, *gd = gphi + kChunk * m;
      const acc_t* Ab = A + b * m * E;
      const acc_t* sb = ksum + b * m;
      load_rows<scalar_t>(q, b, t0, n, xq);
      load_rows<scalar_t>(grad_y, b, t0, n, g);
      features(xq, n, E, m, wt, scale, phi);
      gemm_nn(phi, Ab, n, m, E, num);
      for (int64_t t = 0; t < n; ++t) {  // g becomes gn = g / (d + eps); gd = -sum_e g y / (d + eps)
        const acc_t inv = acc_t(1) / (dot(phi + t * m, sb, m) + acc_t(eps));
        acc_t gy = 0;
        for (int64_t e = 0; e < E; ++e) {
          g[t * E + e] *= inv;
          gy += g[t * E + e] * num[t * E + e];
        }
        gd[t] = -gy * inv;
      }
      gemm_nn(g, At.data() + b * E * m, n, E, m, gphi);  // gQ' = gn A^T + gd s^T
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < m; ++j) gphi[t * m + j] += gd[t] * sb[j];
      acc_t* part = partials.data() + (b * chunks + c) * state_size;
      std::fill(part, part + state_size, acc_t(0));
      gemm_tn(phi, g, n, m, E, part);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < m; ++j) part[m * E + j] += phi[t * m + j] * gd[t];
      feature_grad(gphi, phi, xq, w, n, E, m, gx);
      store_rows<scalar_t>(gx, n, gq, b, t0);
    });
    std::vector<acc_t> grad_state(B * state_size);  // per batch [gA (m, E) | gs (m)]
    sum_partials(partials, B, chunks, state_size, grad_state.data());
    const std::vector<acc_t> gAt = transposed(grad_state.data(), B, state_size, m, E);  // (B, E, m)

    // pass 2: gK' = v gA^T + 1 gs^T, gk through phi, gv = phi(k) gA
    const int64_t scratch2 = kChunk * (4 * E + 2 * m);
    for_each_chunk<acc_t>(B, T, scratch2, [&](int64_t b, int64_t t0, int64_t n, int64_t, acc_t* s) {
      acc_t *xk = s, *xv = xk + kChunk * E, *gx = xv + kChunk * E, *gvt = gx + kChunk * E;
      acc_t *phi = gvt + kChunk * E, *gphi = phi + kChunk * m;
      const acc_t* gA = grad_state.data() + b * state_size;
      const acc_t* gs = gA + m * E;
      load_rows<scalar_t>(k, b, t0, n, xk);
      load_rows<scalar_t>(v, b, t0, n, xv);
      features(xk, n, E, m, wt, scale, phi);
      gemm_nn(xv, gAt.data() + b * E * m, n, E, m, gphi);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < m; ++j) gphi[t * m + j] += gs[j];
      gemm_nn(phi, gA, n, m, E, gvt);
      feature_grad(gphi, phi, xk, w, n, E, m, gx);
      store_rows<scalar_t>(gx, n, gk, b, t0);
      store_rows<scalar_t>(gvt, n, gv, b, t0);
    });
  });
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, CPU, m) {
  m.impl("performer_attention", &performer_attention_cpu);
  m.impl("performer_attention_backward", &performer_attention_backward_cpu);
}

}  // namespace t2t_kernels
