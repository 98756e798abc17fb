// CPU kernels of t2t_kernels::performer_attention and its backward (DESIGN §4).
//
// Every pass walks (batch, chunk of kChunk rows) tasks in parallel. A task computes the features phi(x) of its rows
// into a small per-thread scratch tile (never a (B, T, m) tensor); reductions over T write one partial per task and
// are summed in chunk order afterwards, so results do not depend on the number of threads or on which thread ran
// which task.
//
// Inside a task everything is a small matrix product over the chunk, done by register-blocked tile loops:
//   gemm_rows   out (n, cols) = X (n, K) B (K, cols)      x w^T, g A^T, v gA^T        (K = E, cols = m)
//   gemm_rows2  out (n, cols) = P (n, K) M (K, cols)      phi A, phi gA, (G*P) w      (K = m, cols = E), with the
//                                                          row scaling / "- x * rowsum" epilogue fused
//   gemm_reduce out (m, cols) = P (n, m)^T X (n, cols)    phi^T v, phi^T gn           (sum over the chunk's rows)
// and the per-row work between them (exp, |x|^2, the denominators, the gradient through phi) is vectorised over m.
// Math runs in fp32 (fp64 for fp64 inputs). Columns are padded internally (m -> mp, E -> Ep) to whole register
// blocks; padding is zero and never written out.
//
// The float and double loops are built three times: AVX-512, AVX2+FMA and plain (SSE2), picked once at load time
// from the CPU's features (isa.h; T2T_CPU_ISA=avx2|plain lowers the choice, for testing the fallbacks).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <numeric>

#include "tiles.h"

namespace t2t_kernels {
namespace {

constexpr int64_t kChunk = 128;  // rows per task; fixed, so the order of the sums over T is fixed
// outputs of at least this size are written with streaming stores (they would not stay in cache; measured ~5% faster
// backward at T=3136, B=8; neutral at T=784)
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// Work of the tile loops in units of one vector FMA (for spreading the prefetches): a tile of gemm_rows or
// gemm_rows2, a block of gemm_reduce, a row of feature_rows (about 20 vector operations per exponential)
template <class I, typename acc_t>
constexpr int64_t feature_row_work(int64_t Ep, int64_t mp) {
  return (Ep + 20 * mp) / Simd<acc_t, I::kBytes>::kLanes;
}
template <class I, typename acc_t>
int64_t features_work(int64_t n, int64_t Ep, int64_t mp) {
  return n * feature_row_work<I, acc_t>(Ep, mp);
}

// phi[t] = exp(phi[t] - |x_t|^2 / 2) / sqrt(m) for the n rows of phi (n, mp), which hold x w^T on entry; the padding
// columns (m < mp) are zeroed through mask (1 on the m real columns, 0 beyond). X rows (xs apart) are Ep wide, zero
// beyond E. With kSum: ssum += sum_t phi[t]; with kDot: d[t] = phi[t] . s.
template <class I, bool kSum, bool kDot, typename acc_t>
T2T_INLINE void feature_rows(acc_t* phi, const acc_t* X, int64_t xs, int64_t n, int64_t Ep, int64_t m, int64_t mp,
                             const acc_t* mask, acc_t* ssum, const acc_t* s, acc_t* d, Prefetcher& pf) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  const ScaledExp<acc_t, I::kBytes> exp_scaled(acc_t(1) / std::sqrt(acc_t(m)));
  const bool masked = m < mp;
  for (int64_t t = 0; t < n; ++t) {
    pf.step(feature_row_work<I, acc_t>(Ep, mp));
    const acc_t* xr = X + t * xs;
    vec sq = vec{};
    for (int64_t e = 0; e < Ep; e += L) {
      const vec xv = S::load(xr + e);
      sq += xv * xv;
    }
    const acc_t shift = acc_t(-0.5) * hsum<acc_t, I::kBytes>(sq);
    acc_t* pr = phi + t * mp;
    vec dv = vec{};
    for (int64_t j = 0; j < mp; j += L) {
      vec p = exp_scaled(S::load(pr + j) + shift);
      if (masked) p *= S::load(mask + j);
      S::store(pr + j, p);
      if constexpr (kSum) S::store(ssum + j, S::load(ssum + j) + p);
      if constexpr (kDot) dv += p * S::load(s + j);
    }
    if constexpr (kDot) d[t] = hsum<acc_t, I::kBytes>(dv);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Pass context and tasks

struct Rows {  // a (B, T, E) input with unit last stride
  const void* data;
  int64_t batch_stride, row_stride;
};

Rows rows_of(const at::Tensor& x) { return {x.data_ptr(), x.stride(0), x.stride(1)}; }

template <typename acc_t>
struct Ctx {
  int64_t T, E, m, mp, Ep, chunks, state_size, num_tasks;
  acc_t eps;
  bool stream;         // write the outputs with streaming stores
  const acc_t* wt;     // w^T padded (E, mp)
  const acc_t* w;      // w padded (mp, Ep)
  const acc_t* mask;   // (mp): 1 on the m real columns, 0 on the padding
  const acc_t* state;  // per batch, state_size apart: [M (mp, Ep) | s (mp)]  (A, s forward; gA, gs backward)
  const acc_t* stateT; // per batch, E * mp apart: M^T (E, mp)
  acc_t* partials;     // per task, state_size apart
  Rows in1, in2;       // k, v (forward 1); q (forward 2); q, g (backward 1); k, v (backward 2)
  void *out1, *out2;   // contiguous (B, T, E): y; gq; gk, gv

  struct Chunk {
    int64_t b, t0, n;  // batch element, first row, rows
  };
  // task i: rows [t0, t0 + n) of batch element b
  Chunk chunk(int64_t i) const {
    const int64_t t0 = (i % chunks) * kChunk;
    return {i / chunks, t0, std::min(kChunk, T - t0)};
  }
};

// per-task scratch, in units of acc_t
struct Scratch {
  int64_t xa, xb, phi, h, oa, ob, rv, size;
  Scratch(int64_t mp, int64_t Ep) {
    const int64_t tile = kChunk * Ep, ftile = kChunk * mp;
    xa = 0, xb = xa + tile, phi = xb + tile, h = phi + ftile, oa = h + ftile, ob = oa + tile, rv = ob + tile;
    size = rv + 2 * kChunk;
  }
};

// rows [t0, t0 + n) of batch element b as acc_t, Ep wide: the input itself when it already is, else converted into
// buf with zero padding. Returns the rows, their stride in *stride.
template <typename scalar_t, typename acc_t>
T2T_INLINE const acc_t* load_rows(const Rows& x, int64_t b, int64_t t0, int64_t n, int64_t E, int64_t Ep, acc_t* buf,
                                  int64_t* stride) {
  const scalar_t* base = static_cast<const scalar_t*>(x.data) + b * x.batch_stride + t0 * x.row_stride;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (E == Ep) {
      *stride = x.row_stride;
      return base;
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* row = base + t * x.row_stride;
    acc_t* o = buf + t * Ep;
    for (int64_t e = 0; e < E; ++e) o[e] = static_cast<acc_t>(row[e]);
    for (int64_t e = E; e < Ep; ++e) o[e] = acc_t(0);
  }
  *stride = Ep;
  return buf;
}

// where a task writes rows [t0, t0 + n) of a (B, T, E) output: the output itself when it has the acc_t layout,
// else the staging tile (Ep wide), copied out by finish_rows
template <typename scalar_t, typename acc_t>
T2T_INLINE acc_t* out_rows(void* out, int64_t b, int64_t t0, int64_t T, int64_t E, int64_t Ep, acc_t* staging,
                           int64_t* stride) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (E == Ep) {
      *stride = E;
      return static_cast<acc_t*>(out) + (b * T + t0) * E;
    }
  }
  *stride = Ep;
  return staging;
}

// whether a task writes its rows of an output (at out, rows os apart) with streaming stores: for outputs too big to
// stay in cache (Ctx::stream), only to the output itself (not the staging tile), where every store is aligned
template <class I, typename acc_t>
T2T_INLINE bool streamable(const Ctx<acc_t>& c, const acc_t* out, int64_t os, const acc_t* staging) {
  return c.stream && out != staging && reinterpret_cast<uintptr_t>(out) % I::kBytes == 0 &&
         (os * static_cast<int64_t>(sizeof(acc_t))) % I::kBytes == 0;
}

template <typename scalar_t, typename acc_t>
T2T_INLINE void finish_rows(void* out, int64_t b, int64_t t0, int64_t n, int64_t T, int64_t E, int64_t Ep,
                            const acc_t* staging) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (E == Ep) return;
  }
  scalar_t* dst = static_cast<scalar_t*>(out) + (b * T + t0) * E;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < E; ++e) dst[t * E + e] = static_cast<scalar_t>(staging[t * Ep + e]);
}

// The prefetcher for the rows of task `next` of the given inputs, spread over `work` units of the current task.
template <typename scalar_t, typename acc_t>
T2T_INLINE Prefetcher prefetch_rows(const Ctx<acc_t>& c, int64_t next, const Rows& x1, const Rows* x2, int64_t work) {
  Prefetcher pf;
  if (next >= c.num_tasks) return pf;
  const int64_t b = next / c.chunks, t0 = (next % c.chunks) * kChunk;
  pf.rows = std::min(kChunk, c.T - t0);
  for (const Rows* x : {&x1, x2}) {
    if (x == nullptr) continue;
    const scalar_t* p = static_cast<const scalar_t*>(x->data) + b * x->batch_stride + t0 * x->row_stride;
    pf.add(reinterpret_cast<const char*>(p), x->row_stride * sizeof(scalar_t), c.E * sizeof(scalar_t));
  }
  pf.plan(work);
  return pf;
}

// Forward pass 1: partial [phi(k)^T v | sum_t phi(k)] of one chunk.
template <class I, typename scalar_t, typename acc_t>
T2T_INLINE void forward_reduce_task(const Ctx<acc_t>& c, int64_t i, int64_t next, acc_t* s) {
  const Scratch sc(c.mp, c.Ep);
  const auto [b, t0, n] = c.chunk(i);
  int64_t ks, vs;
  const acc_t* xk = load_rows<scalar_t>(c.in1, b, t0, n, c.E, c.Ep, s + sc.xa, &ks);
  const acc_t* xv = load_rows<scalar_t>(c.in2, b, t0, n, c.E, c.Ep, s + sc.xb, &vs);
  acc_t* phi = s + sc.phi;
  acc_t* part = c.partials + i * c.state_size;
  acc_t* ssum = part + c.mp * c.Ep;
  std::fill(ssum, ssum + c.mp, acc_t(0));
  Prefetcher pf = prefetch_rows<scalar_t>(c, next, c.in1, &c.in2,
                                          rows_work<I, acc_t>(n, c.E, c.mp) + features_work<I, acc_t>(n, c.Ep, c.mp) +
                                              reduce_work<I, acc_t>(n, c.mp, c.Ep));
  gemm_rows<I>(xk, ks, n, c.E, c.wt, c.mp, phi, c.mp, pf);
  feature_rows<I, true, false>(phi, xk, ks, n, c.Ep, c.m, c.mp, c.mask, ssum, (const acc_t*)nullptr, (acc_t*)nullptr, pf);
  gemm_reduce<I>(phi, c.mp, xv, vs, n, c.mp, c.Ep, part, pf);
}

// Forward pass 2: y = phi(q) A / (phi(q) s + eps) for one chunk.
template <class I, typename scalar_t, typename acc_t>
T2T_INLINE void forward_output_task(const Ctx<acc_t>& c, int64_t i, int64_t next, acc_t* s) {
  const Scratch sc(c.mp, c.Ep);
  const auto [b, t0, n] = c.chunk(i);
  const acc_t* A = c.state + b * c.state_size;
  const acc_t* ksum = A + c.mp * c.Ep;
  int64_t qs, ys;
  const acc_t* xq = load_rows<scalar_t>(c.in1, b, t0, n, c.E, c.Ep, s + sc.xa, &qs);
  acc_t *phi = s + sc.phi, *inv = s + sc.rv;
  Prefetcher pf = prefetch_rows<scalar_t>(c, next, c.in1, nullptr,
                                          rows_work<I, acc_t>(n, c.E, c.mp) + features_work<I, acc_t>(n, c.Ep, c.mp) +
                                              rows2_work<I, acc_t>(n, c.m, c.Ep));
  gemm_rows<I>(xq, qs, n, c.E, c.wt, c.mp, phi, c.mp, pf);
  feature_rows<I, false, true>(phi, xq, qs, n, c.Ep, c.m, c.mp, c.mask, (acc_t*)nullptr, ksum, inv, pf);
  for (int64_t t = 0; t < n; ++t) inv[t] = acc_t(1) / (inv[t] + c.eps);
  acc_t* y = out_rows<scalar_t>(c.out1, b, t0, c.T, c.E, c.Ep, s + sc.oa, &ys);
  gemm_rows2<I, Epilogue::kScaleRows>(phi, c.mp, n, c.m, A, c.Ep, y, ys, inv, (const acc_t*)nullptr, 0, pf,
                                      streamable<I>(c, y, ys, s + sc.oa));
  finish_rows<scalar_t>(c.out1, b, t0, n, c.T, c.E, c.Ep, s + sc.oa);
}

// Backward pass 1 for one chunk: gq, and the partial [gA = phi(q)^T gn | gs = phi(q)^T gd].
// With h = g A^T (n, m): g . n = phi . h, so gd = -(phi . h) / (d + eps)^2 and gQ' = h / (d + eps) + gd s.
template <class I, typename scalar_t, typename acc_t>
T2T_INLINE void backward_q_task(const Ctx<acc_t>& c, int64_t i, int64_t next, acc_t* s) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  const Scratch sc(c.mp, c.Ep);
  const auto [b, t0, n] = c.chunk(i);
  const int64_t mp = c.mp;
  const acc_t* A = c.state + b * c.state_size;
  const acc_t* ksum = A + mp * c.Ep;
  int64_t qs, gs_, os;
  const acc_t* xq = load_rows<scalar_t>(c.in1, b, t0, n, c.E, c.Ep, s + sc.xa, &qs);
  const acc_t* g = load_rows<scalar_t>(c.in2, b, t0, n, c.E, c.Ep, s + sc.xb, &gs_);
  acc_t *phi = s + sc.phi, *h = s + sc.h, *d = s + sc.rv, *rsum = d + kChunk;
  acc_t* part = c.partials + i * c.state_size;
  acc_t* gs = part + mp * c.Ep;
  Prefetcher pf = prefetch_rows<scalar_t>(
      c, next, c.in1, &c.in2,
      2 * rows_work<I, acc_t>(n, c.E, mp) + features_work<I, acc_t>(n, c.Ep, mp) + reduce_work<I, acc_t>(n, mp, c.Ep) +
          rows2_work<I, acc_t>(n, c.m, c.Ep));
  gemm_rows<I>(xq, qs, n, c.E, c.wt, mp, phi, mp, pf);
  feature_rows<I, false, true>(phi, xq, qs, n, c.Ep, c.m, mp, c.mask, (acc_t*)nullptr, ksum, d, pf);
  gemm_rows<I>(g, gs_, n, c.E, c.stateT + b * c.E * mp, mp, h, mp, pf);
  std::fill(gs, gs + mp, acc_t(0));
  for (int64_t t = 0; t < n; ++t) {
    acc_t *pr = phi + t * mp, *hr = h + t * mp;
    const acc_t inv = acc_t(1) / (d[t] + c.eps);
    vec ph = vec{};
    for (int64_t j = 0; j < mp; j += L) ph += S::load(pr + j) * S::load(hr + j);
    const acc_t gd = -(hsum<acc_t, I::kBytes>(ph) * inv) * inv;
    vec rs = vec{};
    for (int64_t j = 0; j < mp; j += L) {
      const vec p = S::load(pr + j);
      const vec gp = (S::load(hr + j) * inv + gd * S::load(ksum + j)) * p;  // gQ' * phi
      S::store(hr + j, gp);
      rs += gp;
      S::store(gs + j, S::load(gs + j) + p * gd);
      S::store(pr + j, p * inv);  // phi / (d + eps): gA = (phi / (d + eps))^T g
    }
    rsum[t] = hsum<acc_t, I::kBytes>(rs);
  }
  gemm_reduce<I>(phi, mp, g, gs_, n, mp, c.Ep, part, pf);
  acc_t* gq = out_rows<scalar_t>(c.out1, b, t0, c.T, c.E, c.Ep, s + sc.oa, &os);
  gemm_rows2<I, Epilogue::kMinusXTimesRow>(h, mp, n, c.m, c.w, c.Ep, gq, os, rsum, xq, qs, pf,
                                           streamable<I>(c, gq, os, s + sc.oa));
  finish_rows<scalar_t>(c.out1, b, t0, n, c.T, c.E, c.Ep, s + sc.oa);
}

// Backward pass 2 for one chunk: gK' = v gA^T + 1 gs^T, gk through phi, gv = phi(k) gA.
template <class I, typename scalar_t, typename acc_t>
T2T_INLINE void backward_kv_task(const Ctx<acc_t>& c, int64_t i, int64_t next, acc_t* s) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  const Scratch sc(c.mp, c.Ep);
  const auto [b, t0, n] = c.chunk(i);
  const int64_t mp = c.mp;
  const acc_t* gA = c.state + b * c.state_size;
  const acc_t* gsum = gA + mp * c.Ep;
  int64_t ks, vs, os_k, os_v;
  const acc_t* xk = load_rows<scalar_t>(c.in1, b, t0, n, c.E, c.Ep, s + sc.xa, &ks);
  const acc_t* xv = load_rows<scalar_t>(c.in2, b, t0, n, c.E, c.Ep, s + sc.xb, &vs);
  acc_t *phi = s + sc.phi, *h = s + sc.h, *rsum = s + sc.rv;
  Prefetcher pf = prefetch_rows<scalar_t>(c, next, c.in1, &c.in2,
                                          2 * rows_work<I, acc_t>(n, c.E, mp) + features_work<I, acc_t>(n, c.Ep, mp) +
                                              2 * rows2_work<I, acc_t>(n, c.m, c.Ep));
  gemm_rows<I>(xk, ks, n, c.E, c.wt, mp, phi, mp, pf);
  feature_rows<I, false, false>(phi, xk, ks, n, c.Ep, c.m, mp, c.mask, (acc_t*)nullptr, (const acc_t*)nullptr,
                                (acc_t*)nullptr, pf);
  gemm_rows<I>(xv, vs, n, c.E, c.stateT + b * c.E * mp, mp, h, mp, pf);
  for (int64_t t = 0; t < n; ++t) {
    const acc_t* pr = phi + t * mp;
    acc_t* hr = h + t * mp;
    vec rs = vec{};
    for (int64_t j = 0; j < mp; j += L) {
      const vec gp = (S::load(hr + j) + S::load(gsum + j)) * S::load(pr + j);
      S::store(hr + j, gp);
      rs += gp;
    }
    rsum[t] = hsum<acc_t, I::kBytes>(rs);
  }
  acc_t* gv = out_rows<scalar_t>(c.out2, b, t0, c.T, c.E, c.Ep, s + sc.ob, &os_v);
  gemm_rows2<I, Epilogue::kPlain>(phi, mp, n, c.m, gA, c.Ep, gv, os_v, (const acc_t*)nullptr, (const acc_t*)nullptr,
                                  0, pf, streamable<I>(c, gv, os_v, s + sc.ob));
  acc_t* gk = out_rows<scalar_t>(c.out1, b, t0, c.T, c.E, c.Ep, s + sc.oa, &os_k);
  gemm_rows2<I, Epilogue::kMinusXTimesRow>(h, mp, n, c.m, c.w, c.Ep, gk, os_k, rsum, xk, ks, pf,
                                           streamable<I>(c, gk, os_k, s + sc.oa));
  finish_rows<scalar_t>(c.out2, b, t0, n, c.T, c.E, c.Ep, s + sc.ob);
  finish_rows<scalar_t>(c.out1, b, t0, n, c.T, c.E, c.Ep, s + sc.oa);
}

// ------------------------------------------------------------------------------------------------------------------
// One build of each task per instruction set, picked once.

template <typename acc_t>
using TaskFn = void (*)(const Ctx<acc_t>&, int64_t, int64_t, acc_t*);

#define T2T_TASK_VARIANTS(task)                                                                          \
  template <typename scalar_t, typename acc_t>                                                           \
  T2T_TARGET_AVX512 void task##_avx512(const Ctx<acc_t>& c, int64_t i, int64_t next, acc_t* s) {          \
    task<IsaAvx512, scalar_t>(c, i, next, s);                                                                  \
  }                                                                                                      \
  template <typename scalar_t, typename acc_t>                                                           \
  T2T_TARGET_AVX2 void task##_avx2(const Ctx<acc_t>& c, int64_t i, int64_t next, acc_t* s) {            \
    task<IsaAvx2, scalar_t>(c, i, next, s);                                                                    \
  }                                                                                                      \
  template <typename scalar_t, typename acc_t>                                                           \
  void task##_plain(const Ctx<acc_t>& c, int64_t i, int64_t next, acc_t* s) {                             \
    task<IsaPlain, scalar_t>(c, i, next, s);                                                                   \
  }                                                                                                      \
  template <typename scalar_t, typename acc_t>                                                           \
  TaskFn<acc_t> task##_for(Isa isa) {                                                                    \
    return isa == Isa::kAvx512 ? &task##_avx512<scalar_t, acc_t>                                        \
           : isa == Isa::kAvx2 ? &task##_avx2<scalar_t, acc_t>                                          \
                               : &task##_plain<scalar_t, acc_t>;                                         \
  }

T2T_TASK_VARIANTS(forward_reduce_task)
T2T_TASK_VARIANTS(forward_output_task)
T2T_TASK_VARIANTS(backward_q_task)
T2T_TASK_VARIANTS(backward_kv_task)

// Column padding: mp a multiple of the gemm_rows column block and of gemm_reduce's row block, Ep of both column
// blocks of gemm_rows2 and gemm_reduce (for the instruction set in use, so a padding never splits a block).
template <typename acc_t>
void padded_sizes(Isa isa, int64_t m, int64_t E, int64_t* mp, int64_t* Ep) {
  auto round_up = [](int64_t x, int64_t to) { return (x + to - 1) / to * to; };
  auto lcm = [](int64_t a, int64_t b) { return a / std::gcd(a, b) * b; };
  auto pick = [&](auto traits) {
    using I = decltype(traits);
    constexpr int64_t L = I::kBytes / sizeof(acc_t);
    *mp = round_up(m, lcm(I::C1 * L, I::J3));
    *Ep = round_up(E, lcm(I::C2 * L, I::C3 * L));
  };
  if (isa == Isa::kAvx512)
    pick(IsaAvx512{});
  else
    pick(IsaAvx2{});
}

// ------------------------------------------------------------------------------------------------------------------
// Host side

// partials (B, chunks, size) -> out (B, size), summed in chunk order; in parallel over (batch, slice of size).
template <typename acc_t>
void sum_partials(const acc_t* partials, int64_t B, int64_t chunks, int64_t size, acc_t* out) {
  constexpr int64_t kSlice = 512;
  const int64_t slices = (size + kSlice - 1) / kSlice;
  parallel_tasks(B * slices, 0, [&](int64_t task, int64_t, void*) {
    const int64_t b = task / slices, i0 = (task % slices) * kSlice, i1 = std::min(size, i0 + kSlice);
    acc_t* o = out + b * size;
    std::fill(o + i0, o + i1, acc_t(0));
    for (int64_t c = 0; c < chunks; ++c) {
      const acc_t* p = partials + (b * chunks + c) * size;
      for (int64_t i = i0; i < i1; ++i) o[i] += p[i];
    }
  });
}

// per batch: the (mp, Ep) block at the start of each state_size record, transposed to (E, mp) for the real E columns
template <typename acc_t>
void transpose_states(const acc_t* state, int64_t B, int64_t state_size, int64_t mp, int64_t Ep, int64_t E,
                      acc_t* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < mp; ++j)
      for (int64_t e = 0; e < E; ++e) out[(b * E + e) * mp + j] = state[b * state_size + j * Ep + e];
}

// One host buffer per call: w padded (mp, Ep), w^T padded (E, mp), column mask (mp), and per batch the states
// [M (mp, Ep) | s (mp)] and M^T (E, mp), plus the per-task partials; filled by plain loops (no small ATen ops).
template <typename acc_t>
struct Workspace {
  std::unique_ptr<acc_t[]> buffer;
  acc_t *w, *wt, *mask, *state, *stateT, *partials;

  Workspace(const at::Tensor& w_in, int64_t B, int64_t chunks, int64_t mp, int64_t Ep) {
    const int64_t m = w_in.size(0), E = w_in.size(1), state_size = mp * Ep + mp;
    const int64_t sizes[] = {mp * Ep, E * mp, mp, B * state_size, B * E * mp, B * chunks * state_size};
    int64_t total = 0;
    for (int64_t n : sizes) total += (n + 15) / 16 * 16;
    buffer.reset(new acc_t[total]);
    acc_t** parts[] = {&w, &wt, &mask, &state, &stateT, &partials};
    acc_t* p = buffer.get();
    for (int i = 0; i < 6; ++i) *parts[i] = p, p += (sizes[i] + 15) / 16 * 16;
    const at::Tensor wc = w_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* src = wc.data_ptr<acc_t>();
    std::fill(w, w + mp * Ep, acc_t(0));
    std::fill(wt, wt + E * mp, acc_t(0));
    for (int64_t j = 0; j < m; ++j)
      for (int64_t e = 0; e < E; ++e) w[j * Ep + e] = wt[e * mp + j] = src[j * E + e];
    for (int64_t j = 0; j < mp; ++j) mask[j] = j < m ? acc_t(1) : acc_t(0);
  }
};

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

template <typename acc_t>
void run_tasks(TaskFn<acc_t> fn, const Ctx<acc_t>& c, int64_t num_tasks, int64_t scratch_size) {
  parallel_tasks(num_tasks, scratch_size * static_cast<int64_t>(sizeof(acc_t)),
                 [&](int64_t i, int64_t next, void* scratch) { fn(c, i, next, static_cast<acc_t*>(scratch)); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                       const at::Tensor& v_in, const at::Tensor& w_in,
                                                                       double eps) {
  check_inputs(q_in, k_in, v_in, w_in, eps);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t B = q.size(0), T = q.size(1), E = q.size(2), m = w_in.size(0);
  const auto acc = accumulation_dtype(q.scalar_type());
  at::Tensor y = at::empty({B, T, E}, q.options());
  at::Tensor kv_state = at::empty({B, m, E}, q.options().dtype(acc));
  at::Tensor k_sum = at::empty({B, m}, q.options().dtype(acc));
  if (B == 0 || T == 0) {
    kv_state.zero_();
    k_sum.zero_();
    return {y, kv_state, k_sum};
  }
  const Isa isa = cpu_isa();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "performer_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    int64_t mp, Ep;
    padded_sizes<acc_t>(isa, m, E, &mp, &Ep);
    const int64_t chunks = (T + kChunk - 1) / kChunk, state_size = mp * Ep + mp;
    Workspace<acc_t> ws(w_in, B, chunks, mp, Ep);
    Ctx<acc_t> c{T, E, m, mp, Ep, chunks, state_size, B * chunks, static_cast<acc_t>(eps),
                 B * T * E * q.element_size() >= kStreamBytes};
    c.wt = ws.wt, c.w = ws.w, c.mask = ws.mask, c.partials = ws.partials, c.state = ws.state;
    const int64_t scratch = Scratch(mp, Ep).size;

    // pass 1: per-chunk partials of [phi(k)^T v | sum_t phi(k)], then their sum in chunk order
    c.in1 = rows_of(k), c.in2 = rows_of(v);
    run_tasks(forward_reduce_task_for<scalar_t, acc_t>(isa), c, B * chunks, scratch);
    sum_partials(c.partials, B, chunks, state_size, ws.state);
    acc_t *kv = kv_state.data_ptr<acc_t>(), *ks = k_sum.data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      const acc_t* st = ws.state + b * state_size;
      for (int64_t j = 0; j < m; ++j) {
        std::copy_n(st + j * Ep, E, kv + (b * m + j) * E);
        ks[b * m + j] = st[mp * Ep + j];
      }
    }

    // pass 2: y = phi(q) A / (phi(q) s + eps), per chunk
    c.in1 = rows_of(q), c.out1 = y.data_ptr();
    run_tasks(forward_output_task_for<scalar_t, acc_t>(isa), c, B * chunks, scratch);
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
  at::Tensor gq = at::empty({B, T, E}, q.options());
  at::Tensor gk = at::empty({B, T, E}, q.options());
  at::Tensor gv = at::empty({B, T, E}, q.options());
  if (B == 0 || T == 0) return {gq, gk, gv};
  const Isa isa = cpu_isa();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "performer_attention_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    int64_t mp, Ep;
    padded_sizes<acc_t>(isa, m, E, &mp, &Ep);
    const int64_t chunks = (T + kChunk - 1) / kChunk, state_size = mp * Ep + mp;
    Workspace<acc_t> ws(w_in, B, chunks, mp, Ep);
    // [A | s] padded per batch, and A^T (E, mp)
    const acc_t *kv = kv_state.data_ptr<acc_t>(), *ks = k_sum.data_ptr<acc_t>();
    std::fill(ws.state, ws.state + B * state_size, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      acc_t* st = ws.state + b * state_size;
      for (int64_t j = 0; j < m; ++j) {
        std::copy_n(kv + (b * m + j) * E, E, st + j * Ep);
        st[mp * Ep + j] = ks[b * m + j];
      }
    }
    transpose_states(ws.state, B, state_size, mp, Ep, E, ws.stateT);
    Ctx<acc_t> c{T, E, m, mp, Ep, chunks, state_size, B * chunks, static_cast<acc_t>(eps),
                 B * T * E * q.element_size() >= kStreamBytes};
    c.wt = ws.wt, c.w = ws.w, c.mask = ws.mask, c.partials = ws.partials, c.state = ws.state, c.stateT = ws.stateT;
    const int64_t scratch = Scratch(mp, Ep).size;

    // pass 1: gq per chunk, and per-chunk partials of [gA = phi(q)^T gn | gs = phi(q)^T gd]
    c.in1 = rows_of(q), c.in2 = rows_of(grad_y), c.out1 = gq.data_ptr();
    run_tasks(backward_q_task_for<scalar_t, acc_t>(isa), c, B * chunks, scratch);
    // per batch [gA (mp, Ep) | gs (mp)], over the forward state (no longer needed), and gA^T
    sum_partials(c.partials, B, chunks, state_size, ws.state);
    transpose_states(ws.state, B, state_size, mp, Ep, E, ws.stateT);

    // pass 2: gK' = v gA^T + 1 gs^T, gk through phi, gv = phi(k) gA
    c.in1 = rows_of(k), c.in2 = rows_of(v), c.out1 = gk.data_ptr(), c.out2 = gv.data_ptr();
    run_tasks(backward_kv_task_for<scalar_t, acc_t>(isa), c, B * chunks, scratch);
  });
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, CPU, m) {
  m.impl("performer_attention", &performer_attention_cpu);
  m.impl("performer_attention_backward", &performer_attention_backward_cpu);
}

}  // namespace t2t_kernels
