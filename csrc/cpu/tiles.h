// Building blocks of the CPU kernels (performer_attention.cpp, post_attention.cpp): a deterministic parallel task
// loop with per-thread scratch, fixed-width vectors, a vectorised exp, prefetching, and register-blocked small
// matrix products over blocks of rows. Everything here is inline: each kernel instantiates it for the instruction
// set its loops are built for (isa.h).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "isa.h"

// 32/64-byte vectors pass between always-inline helpers only, so the note that their ABI differs without AVX is moot
#pragma GCC diagnostic ignored "-Wpsabi"

namespace t2t_kernels {
// ------------------------------------------------------------------------------------------------------------------
// Parallel loop over tasks. Threads take the next task from a shared counter (so a thread slowed down by other work
// does fewer tasks) and every task writes only its own outputs, so which thread ran it changes no bit of the result.
// A thread claims its next task before running the current one, which is told it (to prefetch its input rows).
// The threads are at::parallel_for's, i.e. PyTorch's own OpenMP team in the usual builds: right after another ATen op
// its workers are still spinning and start at once, and no second pool competes with them for the cores.

// Per-thread scratch, kept between calls (no allocation or first-touch page faults per call): a few hundred KB per
// thread that ever ran a task. nullptr when out of memory.
inline void* thread_scratch(int64_t bytes) {
  struct Buffer {
    void* data = nullptr;
    int64_t bytes = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (buffer.bytes < bytes) {
    std::free(buffer.data);
    buffer.bytes = (bytes + 4095) / 4096 * 4096;
    buffer.data = std::aligned_alloc(64, buffer.bytes);
    if (buffer.data == nullptr) buffer.bytes = 0;
  }
  return buffer.data;
}

struct TaskQueue {
  std::atomic<int64_t> next{0}, done{0};
  int64_t num_tasks = 0;
  const void* task = nullptr;  // valid until the caller has seen all tasks done
  void (*call)(const void* task, int64_t i, int64_t next, void* scratch) = nullptr;

  void work(void* scratch) {
    for (int64_t i = next.fetch_add(1); i < num_tasks;) {
      const int64_t following = next.fetch_add(1);
      call(task, i, following, scratch);
#if defined(__GNUC__) && defined(__x86_64__)
      asm volatile("sfence" ::: "memory");  // order the task's streaming stores before its completion
#endif
      done.fetch_add(1, std::memory_order_release);
      i = following;
    }
  }
};

struct TeamArgs {
  TaskQueue* queue;
  int64_t scratch_bytes;
};

inline void team_worker(void* data) {
  const TeamArgs& args = *static_cast<const TeamArgs*>(data);
  if (args.queue->next.load(std::memory_order_relaxed) >= args.queue->num_tasks) return;  // nothing left
  void* scratch = thread_scratch(args.scratch_bytes);
  if (scratch == nullptr && args.scratch_bytes > 0) return;  // out of memory: leaves the tasks to the others
  c10::ParallelGuard guard(true);
  args.queue->work(scratch);
}

template <typename Task>
void parallel_tasks(int64_t num_tasks, int64_t scratch_bytes, const Task& task) {
  if (num_tasks <= 0) return;
  void* scratch = thread_scratch(scratch_bytes);
  TORCH_CHECK(scratch != nullptr || scratch_bytes == 0, "t2t_kernels (cpp): out of memory for ",
              scratch_bytes, " bytes of scratch");
  int64_t threads = std::min<int64_t>(at::get_num_threads(), num_tasks);
  if (at::in_parallel_region()) threads = 1;
  TaskQueue queue;
  queue.num_tasks = num_tasks;
  queue.task = &task;
  queue.call = [](const void* t, int64_t i, int64_t next, void* scratch) {
    (*static_cast<const Task*>(t))(i, next, scratch);
  };
  TeamArgs args{&queue, scratch_bytes};
  if (threads > 1) {
    // one index per thread; each takes tasks from the queue until none is left
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) team_worker(&args);
    });
  } else {
    team_worker(&args);
  }
  TORCH_INTERNAL_ASSERT(queue.done.load(std::memory_order_acquire) == num_tasks);
}

// ------------------------------------------------------------------------------------------------------------------
// Fixed-width vectors (GCC/Clang vector extensions): kept in registers, lowered to the SIMD the function is built for.

template <typename acc_t, int Bytes>
struct Simd {
  typedef acc_t vec __attribute__((vector_size(Bytes)));
  static constexpr int kLanes = Bytes / sizeof(acc_t);
  static T2T_INLINE vec load(const acc_t* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static T2T_INLINE void store(acc_t* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
};

// lane-wise max (a NaN in a is passed over, one in b kept)
template <typename vec>
T2T_INLINE vec vmax(vec a, vec b) {
  return a > b ? a : b;
}

// v's two halves combined lane-wise by op, again and again down to 16 bytes
template <typename acc_t, int Bytes, class Op>
T2T_INLINE typename Simd<acc_t, 16>::vec fold_halves(typename Simd<acc_t, Bytes>::vec v, Op op) {
  if constexpr (Bytes > 16) {
    typename Simd<acc_t, Bytes / 2>::vec lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return fold_halves<acc_t, Bytes / 2>(op(lo, hi), op);
  } else {
    return v;
  }
}

// the largest lane, halving the vector each step
template <typename acc_t, int Bytes>
T2T_INLINE acc_t hmax(typename Simd<acc_t, Bytes>::vec v) {
  const auto m16 = fold_halves<acc_t, Bytes>(v, [](auto a, auto b) { return vmax(a, b); });
  acc_t m = m16[0];
  for (int i = 1; i < Simd<acc_t, 16>::kLanes; ++i) m = m16[i] > m ? m16[i] : m;
  return m;
}

// v's first `count` lanes, the rest from fill
template <typename acc_t, int Bytes>
T2T_INLINE typename Simd<acc_t, Bytes>::vec lanes_below(typename Simd<acc_t, Bytes>::vec v, int64_t count,
                                                        typename Simd<acc_t, Bytes>::vec fill) {
  using lane_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;
  typedef lane_t ivec __attribute__((vector_size(Bytes)));
  ivec index;
  for (int i = 0; i < Simd<acc_t, Bytes>::kLanes; ++i) index[i] = i;
  return index < static_cast<lane_t>(count) ? v : fill;
}

// f(0), ..., f(U - 1), unrolled: one step of a computation over U independent vectors. Written step by step across
// the vectors, a long chain (a polynomial, an exp) runs U at a time; one vector's chain after another's leaves the
// core waiting on each step's latency.
template <int U, class F>
T2T_INLINE void each_vector(F&& f) {
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) f(u);
}

// sum of the lanes, halving the vector each step (fixed order)
template <typename acc_t, int Bytes>
T2T_INLINE acc_t hsum(typename Simd<acc_t, Bytes>::vec v_in) {
  auto v = fold_halves<acc_t, Bytes>(v_in, [](auto a, auto b) { return a + b; });
  if constexpr (sizeof(acc_t) == 4) {
    typedef int32_t ivec __attribute__((vector_size(16)));
    v += __builtin_shuffle(v, ivec{2, 3, 0, 1});
    v += __builtin_shuffle(v, ivec{1, 0, 3, 2});
    return v[0];
  } else {
    acc_t s = 0;
    for (int i = 0; i < Simd<acc_t, 16>::kLanes; ++i) s += v[i];
    return s;
  }
}

// scale * exp(x) for a vector. float: the Cephes expf polynomial with the scale folded into its coefficients
// (relative error <= 1.3e-7 against exp(x) * scale in double, measured over [-87, 88]; std::exp does not vectorise
// without -ffast-math); x is clamped to [-88, 88] (NaN passes), k = round(x / ln 2) comes from the magic-number
// rounding, whose low bits also give 2^k (zero below about -87.9: underflow to 0).
template <typename acc_t, int Bytes>
struct ScaledExp;

template <int Bytes>
struct ScaledExp<float, Bytes> {
  using vec = typename Simd<float, Bytes>::vec;
  typedef int32_t ivec __attribute__((vector_size(Bytes)));
  vec c0, c1, c2, c3, c4, c5, s;
  explicit ScaledExp(float scale)
      : c0(vec{} + 1.9875691500e-4f * scale),
        c1(vec{} + 1.3981999507e-3f * scale),
        c2(vec{} + 8.3334519073e-3f * scale),
        c3(vec{} + 4.1665795894e-2f * scale),
        c4(vec{} + 1.6666665459e-1f * scale),
        c5(vec{} + 5.0000001201e-1f * scale),
        s(vec{} + scale) {}
  T2T_INLINE vec operator()(vec x) const {
    const vec lo = vec{} - 88.0f, hi = vec{} + 88.0f;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const vec magic = vec{} + 12583039.0f;  // 1.5 * 2^23 + 127: t's low mantissa bits hold k + 127
    const vec t = x * 1.44269504088896341f + magic;
    const vec k = t - magic;
    const vec r = x - k * 0.693359375f + k * 2.12194440e-4f;
    vec p = c0 * r + c1;
    p = p * r + c2;
    p = p * r + c3;
    p = p * r + c4;
    p = p * r + c5;
    const vec e = p * (r * r) + (r * s + s);  // scale * exp(r)
    ivec bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits <<= 23;  // (k + 127) << 23: 2^k
    vec two_to_k;
    std::memcpy(&two_to_k, &bits, sizeof(two_to_k));
    return e * two_to_k;
  }
};

template <int Bytes>
struct ScaledExp<double, Bytes> {
  using vec = typename Simd<double, Bytes>::vec;
  double s;
  explicit ScaledExp(double scale) : s(scale) {}
  T2T_INLINE vec operator()(vec x) const {
    for (int i = 0; i < Simd<double, Bytes>::kLanes; ++i) x[i] = std::exp(x[i]) * s;
    return x;
  }
};

// dst = src^T * scale for one L x L block (L = the vector's lanes): src rows ss apart, dst rows ds apart. log2(L)
// rounds of the perfect shuffle (row i and row i + L/2 interleaved into rows 2i and 2i + 1) transpose it in registers
// (the 16-lane case is 64 two-source permutes), where an element-wise transpose is a scalar load and store each.
template <class I, typename acc_t>
T2T_INLINE void transpose_block(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, acc_t scale) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  using lane_int = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef lane_int ivec __attribute__((vector_size(I::kBytes)));
  ivec lo, hi;
#pragma GCC unroll 16
  for (int i = 0; i < L / 2; ++i) {
    lo[2 * i] = i, lo[2 * i + 1] = i + L;
    hi[2 * i] = i + L / 2, hi[2 * i + 1] = i + L / 2 + L;
  }
  vec r[L], t[L];
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) r[i] = S::load(src + i * ss) * scale;
#pragma GCC unroll 8
  for (int round = 1; round < L; round *= 2) {
#pragma GCC unroll 16
    for (int i = 0; i < L / 2; ++i) {
      t[2 * i] = __builtin_shuffle(r[i], r[i + L / 2], lo);
      t[2 * i + 1] = __builtin_shuffle(r[i], r[i + L / 2], hi);
    }
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) r[i] = t[i];
  }
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) S::store(dst + i * ds, r[i]);
}

// Issues prefetches (into L2) for the input rows of the task a thread runs next, a few at each step() of the
// current task's loops, so that the reads from memory overlap the arithmetic.
struct Prefetcher {
  static constexpr int kMaxSources = 4;
  const char* base[kMaxSources] = {};
  int64_t stride[kMaxSources] = {};  // bytes between rows
  int64_t sources = 0, rows = 0, lines_per_row = 0;
  int64_t total_lines = 0, total_work = 1, work_done = 0, issued = 0;
  // position of the next line
  const char* ptr = nullptr;
  int64_t src = 0, row = 0, line = 0;

  void add(const char* p, int64_t row_stride_bytes, int64_t row_bytes) {
    base[sources] = p, stride[sources] = row_stride_bytes;
    const bool aligned = reinterpret_cast<uintptr_t>(p) % 64 == 0 && row_stride_bytes % 64 == 0;
    lines_per_row = std::max(lines_per_row, (row_bytes + 63) / 64 + (aligned ? 0 : 1));
    if (sources++ == 0) ptr = p;
  }
  // spread the prefetches over the task in proportion to its work: the task's loops report `total_work` units in
  // all through step(units)
  void plan(int64_t total_work_units) {
    total_lines = sources * rows * lines_per_row;
    total_work = std::max<int64_t>(total_work_units, 1);
  }
  T2T_INLINE void step(int64_t work) {
    work_done += work;
    const int64_t target = std::min(total_lines, work_done * total_lines / total_work);
    for (; issued < target; ++issued) {
      __builtin_prefetch(ptr + line * 64, 0, 2);
      if (++line == lines_per_row) {
        line = 0;
        ptr += stride[src];
        if (++row == rows) {
          row = 0;
          if (++src < sources) ptr = base[src];
        }
      }
    }
  }
};

// Register blocking per instruction set: gemm_rows R1 rows x C1 vectors, gemm_rows2 R2 x C2, gemm_reduce J3 x C3.
struct IsaAvx512 {
  static constexpr int kBytes = 64;
  static constexpr int R1 = 8, C1 = 2, R2 = 4, C2 = 4, J3 = 4, C3 = 4;
};
struct IsaAvx2 {  // 16 vector registers
  static constexpr int kBytes = 32;
  static constexpr int R1 = 6, C1 = 2, R2 = 6, C2 = 2, J3 = 4, C3 = 2;
};
struct IsaPlain {  // SSE2: 16-byte vectors; 32-byte ones would need twice the 16 registers and spill
  static constexpr int kBytes = 16;
  static constexpr int R1 = 6, C1 = 2, R2 = 6, C2 = 2, J3 = 4, C3 = 2;
};

enum class Epilogue { kPlain, kScaleRows, kMinusXTimesRow, kPlusX };

// A store that bypasses the caches (the rows of an output, written once): p aligned to the vector size. Inline asm,
// which is not tied to the function's target; plain stores where the instruction set has no such vector store.
template <class I, typename acc_t>
T2T_INLINE void stream_store(acc_t* p, typename Simd<acc_t, I::kBytes>::vec v) {
  using vec = typename Simd<acc_t, I::kBytes>::vec;
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (std::is_same_v<I, IsaAvx512> && sizeof(acc_t) == 4) {
    asm("vmovntps %1, %0" : "=m"(*reinterpret_cast<vec*>(p)) : "v"(v));
    return;
  } else if constexpr (std::is_same_v<I, IsaAvx512> && sizeof(acc_t) == 8) {
    asm("vmovntpd %1, %0" : "=m"(*reinterpret_cast<vec*>(p)) : "v"(v));
    return;
  } else if constexpr (std::is_same_v<I, IsaAvx2> && sizeof(acc_t) == 4) {
    asm("vmovntps %1, %0" : "=m"(*reinterpret_cast<vec*>(p)) : "x"(v));
    return;
  } else if constexpr (std::is_same_v<I, IsaAvx2> && sizeof(acc_t) == 8) {
    asm("vmovntpd %1, %0" : "=m"(*reinterpret_cast<vec*>(p)) : "x"(v));
    return;
  }
#endif
  Simd<acc_t, I::kBytes>::store(p, v);
}

// out (n, cols) = P (n, K) M (K, cols), then per row t: kScaleRows multiplies by rs[t], kMinusXTimesRow subtracts
// X[t] * rs[t], kPlusX adds X[t] (X rows xs apart, at least cols wide; xs = 0 adds one row to all: a bias).
// P rows ps apart, M rows ms apart, out rows os apart.
// A last partial block of rows repeats the last row and drops its extra results. R x C vectors: the register tile.
template <class I, int R, int C, Epilogue Epi, typename acc_t>
T2T_INLINE void gemm_tiles(const acc_t* P, int64_t ps, int64_t n, int64_t K, const acc_t* Mm, int64_t ms,
                           int64_t cols, acc_t* out, int64_t os, const acc_t* rs, const acc_t* X, int64_t xs,
                           Prefetcher& pf, bool stream) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  for (int64_t t0 = 0; t0 < n; t0 += R) {
    const acc_t* pr[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) pr[r] = P + std::min<int64_t>(t0 + r, n - 1) * ps;
    const int64_t rows = std::min<int64_t>(R, n - t0);
    for (int64_t c0 = 0; c0 < cols; c0 += C * L) {
      pf.step(R * C * K);
      vec acc[R][C];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) acc[r][c] = vec{};
      const acc_t* mk = Mm + c0;
      for (int64_t k = 0; k < K; ++k, mk += ms) {
        vec bv[C];
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) bv[c] = S::load(mk + c * L);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const acc_t a = pr[r][k];
#pragma GCC unroll 16
          for (int c = 0; c < C; ++c) acc[r][c] += a * bv[c];
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        if (r >= rows) continue;
        const int64_t t = t0 + r;
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) {
          vec o = acc[r][c];
          if constexpr (Epi == Epilogue::kScaleRows) o = o * rs[t];
          if constexpr (Epi == Epilogue::kMinusXTimesRow) o = o - S::load(X + t * xs + c0 + c * L) * rs[t];
          if constexpr (Epi == Epilogue::kPlusX) o = o + S::load(X + t * xs + c0 + c * L);
          if (stream)
            stream_store<I>(out + t * os + c0 + c * L, o);
          else
            S::store(out + t * os + c0 + c * L, o);
        }
      }
    }
  }
}

// out (n, cols) = X (n, K) B (K, cols): X rows xs apart, B row-major, out rows os apart; cols a multiple of C1 vectors.
template <class I, typename acc_t>
T2T_INLINE void gemm_rows(const acc_t* X, int64_t xs, int64_t n, int64_t K, const acc_t* Bm, int64_t cols, acc_t* out,
                          int64_t os, Prefetcher& pf) {
  gemm_tiles<I, I::R1, I::C1, Epilogue::kPlain>(X, xs, n, K, Bm, cols, cols, out, os, (const acc_t*)nullptr,
                                                (const acc_t*)nullptr, 0, pf, false);
}

// gemm_tiles with the R2 x C2 tile and an epilogue (see above); cols a multiple of C2 vectors.
template <class I, Epilogue Epi, typename acc_t>
T2T_INLINE void gemm_rows2(const acc_t* P, int64_t ps, int64_t n, int64_t K, const acc_t* Mm, int64_t cols, acc_t* out,
                           int64_t os, const acc_t* rs, const acc_t* X, int64_t xs, Prefetcher& pf,
                           bool stream = false) {
  gemm_tiles<I, I::R2, I::C2, Epi>(P, ps, n, K, Mm, cols, cols, out, os, rs, X, xs, pf, stream);
}

// out (mp, cols) = P (n, mp)^T X (n, cols), written: the sum over the n rows, in row order. P rows ps apart, X rows xs
// apart; mp a multiple of J3, cols of C3 vectors; out row-major.
template <class I, typename acc_t>
T2T_INLINE void gemm_reduce(const acc_t* P, int64_t ps, const acc_t* X, int64_t xs, int64_t n, int64_t mp, int64_t cols,
                            acc_t* out, Prefetcher& pf) {
  using S = Simd<acc_t, I::kBytes>;
  using vec = typename S::vec;
  constexpr int J = I::J3, C = I::C3, L = S::kLanes;
  for (int64_t j0 = 0; j0 < mp; j0 += J) {
    for (int64_t c0 = 0; c0 < cols; c0 += C * L) {
      pf.step(J * C * n);
      vec acc[J][C];
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) acc[j][c] = vec{};
      const acc_t* pt = P + j0;
      const acc_t* xt = X + c0;
      for (int64_t t = 0; t < n; ++t, pt += ps, xt += xs) {
        vec bv[C];
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) bv[c] = S::load(xt + c * L);
#pragma GCC unroll 16
        for (int j = 0; j < J; ++j) {
          const acc_t a = pt[j];
#pragma GCC unroll 16
          for (int c = 0; c < C; ++c) acc[j][c] += a * bv[c];
        }
      }
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) S::store(out + (j0 + j) * cols + c0 + c * L, acc[j][c]);
    }
  }
}

// Work of gemm_tiles (R x C tiles), gemm_rows, gemm_rows2 and gemm_reduce in the units they report to the
// Prefetcher (vector FMAs)
template <class I, int R, int C, typename acc_t>
int64_t tiles_work(int64_t n, int64_t K, int64_t cols) {
  return (n + R - 1) / R * (cols / (C * Simd<acc_t, I::kBytes>::kLanes)) * R * C * K;
}
template <class I, typename acc_t>
int64_t rows_work(int64_t n, int64_t K, int64_t cols) {
  return tiles_work<I, I::R1, I::C1, acc_t>(n, K, cols);
}
template <class I, typename acc_t>
int64_t rows2_work(int64_t n, int64_t K, int64_t cols) {
  return tiles_work<I, I::R2, I::C2, acc_t>(n, K, cols);
}
template <class I, typename acc_t>
int64_t reduce_work(int64_t n, int64_t mp, int64_t cols) {
  return mp / I::J3 * (cols / (I::C3 * Simd<acc_t, I::kBytes>::kLanes)) * I::J3 * I::C3 * n;
}

// cols rounded up to whole register blocks of gemm_rows2 (the widest set's, so every set's blocks divide it)
template <typename acc_t>
int64_t padded_cols(int64_t cols) {
  constexpr int64_t block = IsaAvx512::C2 * IsaAvx512::kBytes / sizeof(acc_t);
  static_assert(block % (IsaAvx2::C2 * IsaAvx2::kBytes / sizeof(acc_t)) == 0, "AVX2 blocks must divide AVX-512's");
  return (cols + block - 1) / block * block;
}

// Kernel<I>::run built for the instruction set isa, with that set's register blocking I
template <template <class> class Kernel>
auto isa_kernel(Isa isa) {
  using Fn = decltype(&Kernel<IsaAvx512>::run);
  if (isa == Isa::kAvx512) return isa_variant_of<Kernel<IsaAvx512>>(isa, static_cast<Fn>(nullptr));
  if (isa == Isa::kAvx2) return isa_variant_of<Kernel<IsaAvx2>>(isa, static_cast<Fn>(nullptr));
  return isa_variant_of<Kernel<IsaPlain>>(isa, static_cast<Fn>(nullptr));
}

// isa_kernel's Kernel<I> for one dtype of a task whose run is templated on the dtype: TaskT<I>::run<acc_t>
template <template <class> class TaskT, template <typename> class ArgsT, typename acc_t>
struct ForDtype {
  template <class I>
  struct Task {
    static T2T_INLINE void run(const ArgsT<acc_t>* a, int64_t task, int64_t next, acc_t* s) {
      TaskT<I>::run(a, task, next, s);
    }
  };
};

// TaskT<I>::run(&args, i, next, scratch) for tasks i in [0, num_tasks) on parallel_tasks' threads, built for the
// instruction set isa; scratch: scratch_elems of acc_t per thread
template <template <class> class TaskT, template <typename> class ArgsT, typename acc_t>
void parallel_isa_tasks(Isa isa, const ArgsT<acc_t>& args, int64_t num_tasks, int64_t scratch_elems) {
  const auto task = isa_kernel<ForDtype<TaskT, ArgsT, acc_t>::template Task>(isa);
  parallel_tasks(num_tasks, scratch_elems * static_cast<int64_t>(sizeof(acc_t)),
                 [&](int64_t i, int64_t next, void* scratch) { task(&args, i, next, static_cast<acc_t*>(scratch)); });
}

}  // namespace t2t_kernels
