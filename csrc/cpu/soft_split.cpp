// CPU kernels of t2t_kernels::soft_split and its backward (DESIGN §4).
//
// Forward: out (B, L, C*kh*kw) contiguous, out[b, oy*ow + ox, (c*kh + i)*kw + j] = x[b, c, oy*sh - ph + i,
// ox*sw - pw + j] (zero in the padding), read straight from x's strides: a contiguous image, a channels_last one
// or the token view (B, N, C) -> (B, C, h, w) all take one read of x and one write of the output.
// Backward: the fold of grad_out, as a gather per input row: task (b, y) owns row y of grad_x and sums, for each of
// its pixels, the <= ceil(kh/sh) * ceil(kw/sw) windows that cover it, in a fixed order (kernel row i, then kernel
// column j, ascending: the order of ATen's col2im), into an fp32 (fp64 for fp64) row buffer. No atomics; the result
// does not depend on the number of threads.
// At padded edges the valid kernel rows/columns are computed first: no pointer outside x is ever formed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../soft_split_geometry.h"
#include "tiles.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace t2t_kernels {
namespace {

using soft_split_detail::check_grad_out;
using soft_split_detail::empty_grad_x;
using soft_split_detail::Geometry;
using soft_split_detail::make_geometry;

void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpp): ", name, " must be a CPU tensor, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              " (cpp): ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

// Valid kernel offsets [lo, hi), 0 <= lo <= hi <= k, of a window starting at `start` over an axis of length n.
// start may be negative (padding) and, when padding >= k, the whole window may lie in the padding on either side.
inline void valid_range(int64_t start, int64_t k, int64_t n, int64_t& lo, int64_t& hi) {
  lo = std::min<int64_t>(k, std::max<int64_t>(0, -start));
  hi = std::max<int64_t>(lo, std::min<int64_t>(k, n - start));
}

// ---- forward ----------------------------------------------------------------------------------------------------

// KW > 0 fixes the kernel width at compile time (the model's 7 and 3), so the inner copies unroll.
template <typename T, int64_t KW>
void forward_row_wmajor(const T* xb, T* out, const Geometry& g, int64_t oy, int64_t sC, int64_t sH, int64_t sW) {
  // W has the smallest stride (a contiguous image): per (pixel, c, i) copy the kw contiguous elements of a row.
  const int64_t kw = KW > 0 ? KW : g.kw, kh = g.kh, kk = kh * kw, y0 = oy * g.sh - g.ph;
  int64_t ilo, ihi;
  valid_range(y0, kh, g.H, ilo, ihi);
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    T* o = out + ox * g.F();
    const int64_t x0 = ox * g.sw - g.pw;
    int64_t jlo, jhi;
    valid_range(x0, kw, g.W, jlo, jhi);
    if (KW > 0 && sW == 1 && ilo == 0 && ihi == kh && jlo == 0 && jhi == kw) {
      // an interior window of a contiguous image: kh * C fixed-size row copies, no padding to test
      for (int64_t c = 0; c < g.C; ++c) {
        const T* src = xb + c * sC + y0 * sH + x0;
        T* oc = o + c * kk;
        for (int64_t i = 0; i < kh; ++i) std::memcpy(oc + i * KW, src + i * sH, KW * sizeof(T));
      }
      continue;
    }
    for (int64_t c = 0; c < g.C; ++c) {
      T* oc = o + c * kk;
      std::fill(oc, oc + ilo * kw, T(0));
      for (int64_t i = ilo; i < ihi; ++i) {
        T* oi = oc + i * kw;
        if (jlo == 0 && jhi == kw) {
          const T* src = xb + c * sC + (y0 + i) * sH + x0 * sW;  // x0 >= 0 here
          if (sW == 1) {
            if constexpr (KW > 0)
              std::memcpy(oi, src, KW * sizeof(T));  // a constant size: a few (overlapping) vector moves
            else
              std::copy(src, src + kw, oi);
          } else {
            for (int64_t j = 0; j < kw; ++j) oi[j] = src[j * sW];
          }
        } else {
          for (int64_t j = 0; j < jlo; ++j) oi[j] = T(0);
          if (jhi > jlo) {
            const T* src = xb + c * sC + (y0 + i) * sH + (x0 + jlo) * sW;
            for (int64_t j = jlo; j < jhi; ++j) oi[j] = src[(j - jlo) * sW];
          }
          for (int64_t j = jhi; j < kw; ++j) oi[j] = T(0);
        }
      }
      std::fill(oc + ihi * kw, oc + kk, T(0));
    }
  }
}

template <typename T, int64_t KK>
void forward_row_cmajor(const T* xb, T* out, const Geometry& g, int64_t oy, int64_t sC, int64_t sH, int64_t sW,
                        const T* zeros, const T** taps) {
  // C has the smallest stride (channels_last, or the token view). The output of one pixel is C*kk contiguous
  // elements: with unit channel stride, point each of the kk taps at its input pixel's C values (or at a row of C
  // zeros when it lies in the padding) and write the pixel's output in order, c outer, tap inner.
  const int64_t kk = KK > 0 ? KK : g.kk(), kh = g.kh, kw = g.kw, C = g.C, y0 = oy * g.sh - g.ph;
  int64_t ilo, ihi;
  valid_range(y0, kh, g.H, ilo, ihi);
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    T* o = out + ox * g.F();
    const int64_t x0 = ox * g.sw - g.pw;
    int64_t jlo, jhi;
    valid_range(x0, kw, g.W, jlo, jhi);
    if (sC == 1) {
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j)
          taps[i * kw + j] = (i < ilo || i >= ihi || j < jlo || j >= jhi) ? zeros : xb + (y0 + i) * sH + (x0 + j) * sW;
      for (int64_t c = 0; c < C; ++c) {
        T* oc = o + c * kk;
        for (int64_t t = 0; t < kk; ++t) oc[t] = taps[t][c];
      }
      continue;
    }
    for (int64_t i = 0; i < kh; ++i) {
      for (int64_t j = 0; j < kw; ++j) {
        T* dst = o + i * kw + j;
        if (i < ilo || i >= ihi || j < jlo || j >= jhi) {
          for (int64_t c = 0; c < C; ++c) dst[c * kk] = T(0);
        } else {
          const T* src = xb + (y0 + i) * sH + (x0 + j) * sW;
          if (sC == 1) {
            for (int64_t c = 0; c < C; ++c) dst[c * kk] = src[c];
          } else {
            for (int64_t c = 0; c < C; ++c) dst[c * kk] = src[c * sC];
          }
        }
      }
    }
  }
}

// Writes window row r = b*oh + oy of the soft split (ow * C*kh*kw elements) from x through its strides; holds the
// per-thread buffers of the channels-innermost path. One per task: the fused layer norm reuses it, forward and backward.
template <typename T>
class RowGatherer {
 public:
  RowGatherer(const at::Tensor& x, const Geometry& g)
      : xp_(x.const_data_ptr<T>()), sB_(x.stride(0)), sC_(x.stride(1)), sH_(x.stride(2)), sW_(x.stride(3)), g_(g),
        cmajor_(g.C > 1 && sC_ < sW_),  // channels innermost when C's stride is the smallest (C = 1 gains nothing)
        zeros_(cmajor_ ? g.C : 0, T(0)), taps_(cmajor_ ? g.kk() : 0) {}

  void operator()(int64_t r, T* out) {
    const int64_t oy = r % g_.oh;
    const T* xb = xp_ + (r / g_.oh) * sB_;
    if (cmajor_) {
      if (g_.kk() == 9)
        forward_row_cmajor<T, 9>(xb, out, g_, oy, sC_, sH_, sW_, zeros_.data(), taps_.data());
      else
        forward_row_cmajor<T, 0>(xb, out, g_, oy, sC_, sH_, sW_, zeros_.data(), taps_.data());
    } else if (g_.kw == 7) {
      forward_row_wmajor<T, 7>(xb, out, g_, oy, sC_, sH_, sW_);
    } else if (g_.kw == 3) {
      forward_row_wmajor<T, 3>(xb, out, g_, oy, sC_, sH_, sW_);
    } else {
      forward_row_wmajor<T, 0>(xb, out, g_, oy, sC_, sH_, sW_);
    }
  }

 private:
  const T* xp_;
  int64_t sB_, sC_, sH_, sW_;
  const Geometry& g_;
  bool cmajor_;
  std::vector<T> zeros_;  // what a tap in the padding reads
  std::vector<const T*> taps_;
};

// window rows per parallel_for task: about 16K output elements
inline int64_t window_row_grain(const Geometry& g) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.ow * g.F()));
}

template <typename T>
void soft_split_forward_impl(const at::Tensor& x, at::Tensor& out, const Geometry& g) {
  T* op = out.mutable_data_ptr<T>();
  const int64_t row = g.ow * g.F();  // output elements of one row of windows
  at::parallel_for(0, g.B * g.oh, window_row_grain(g), [&](int64_t begin, int64_t end) {
    RowGatherer<T> gather(x, g);
    for (int64_t r = begin; r < end; ++r) gather(r, op + r * row);
  });
}

at::Tensor soft_split_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding) {
  constexpr const char* op = "soft_split";
  TORCH_CHECK(x.dim() == 4, op, " (cpp): x must be 4-D (B, C, H, W), got shape ", x.sizes());
  check_dtype(op, "x", x);
  const Geometry g = make_geometry(op, x.sizes(), kernel_size, stride, padding);
  at::Tensor out = at::empty({g.B, g.L(), g.F()}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "soft_split_cpu",
                                  [&] { soft_split_forward_impl<scalar_t>(x, out, g); });
  return out;
}

// ---- backward ---------------------------------------------------------------------------------------------------

template <typename T, typename acc_t, bool kChannelsLast, int64_t KW>
void backward_row(const T* gb, acc_t* acc, const Geometry& g, int64_t y) {
  // acc: row y of grad_x, (C, W) or, channels_last, (W, C); zeroed by the caller. KW > 0: kw known at compile time.
  const int64_t F = g.F(), kk = g.kk(), kw = KW > 0 ? KW : g.kw, C = g.C, W = g.W;
  // windows oy whose kernel row i = y + ph - oy*sh lies in [0, kh); descending oy is ascending i
  const int64_t top = y + g.ph;
  const int64_t oy_hi = std::min<int64_t>(g.oh - 1, top / g.sh);
  const int64_t oy_lo = top >= g.kh ? (top - g.kh) / g.sh + 1 : 0;
  for (int64_t oy = oy_hi; oy >= oy_lo; --oy) {
    const int64_t i = top - oy * g.sh;
    const T* grow = gb + oy * g.ow * F + i * kw;
    for (int64_t ox = g.ow - 1; ox >= 0; --ox) {  // descending ox: ascending j for each pixel
      const int64_t x0 = ox * g.sw - g.pw;
      int64_t jlo, jhi;
      valid_range(x0, kw, W, jlo, jhi);
      if (jhi <= jlo) continue;
      const T* gp = grow + ox * F;
      if constexpr (kChannelsLast) {
        for (int64_t j = jlo; j < jhi; ++j) {
          acc_t* a = acc + (x0 + j) * C;
          for (int64_t c = 0; c < C; ++c) a[c] += static_cast<acc_t>(gp[c * kk + j]);
        }
      } else {
        if (KW > 0 && jlo == 0 && jhi == kw) {  // an interior window: a fixed-length, unrolled sum
          for (int64_t c = 0; c < C; ++c) {
            acc_t* a = acc + c * W + x0;
            const T* gc = gp + c * kk;
            for (int64_t j = 0; j < KW; ++j) a[j] += static_cast<acc_t>(gc[j]);
          }
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          acc_t* a = acc + c * W + x0;  // a[j] only for j in [jlo, jhi): x0 + j >= 0
          const T* gc = gp + c * kk;
          for (int64_t j = jlo; j < jhi; ++j) a[j] += static_cast<acc_t>(gc[j]);
        }
      }
    }
  }
}

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// grad_x (T) = the fold of the token gradient gp (G: T, or acc_type<T> from the fused layer norm's backward)
template <typename G, typename T>
void fold_impl(const G* gp, T* xp, const Geometry& g, bool channels_last) {
  using acc_t = acc_type<T>;
  const int64_t C = g.C, H = g.H, W = g.W;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * W));
  at::parallel_for(0, g.B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C * W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      const G* gb = gp + b * g.L() * g.F();
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (channels_last) {
        backward_row<G, acc_t, true, 0>(gb, acc.data(), g, y);
        T* dst = xp + r * W * C;  // (B, H, W, C) memory: row (b, y) is W*C contiguous elements
        for (int64_t n = 0; n < W * C; ++n) dst[n] = static_cast<T>(acc[n]);
      } else {
        if (g.kw == 7)
          backward_row<G, acc_t, false, 7>(gb, acc.data(), g, y);
        else if (g.kw == 3)
          backward_row<G, acc_t, false, 3>(gb, acc.data(), g, y);
        else
          backward_row<G, acc_t, false, 0>(gb, acc.data(), g, y);
        for (int64_t c = 0; c < C; ++c) {
          T* dst = xp + ((b * C + c) * H + y) * W;
          const acc_t* a = acc.data() + c * W;
          for (int64_t n = 0; n < W; ++n) dst[n] = static_cast<T>(a[n]);
        }
      }
    }
  });
}

at::Tensor soft_split_backward_cpu(const at::Tensor& grad_out_in, at::IntArrayRef input_size,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   bool channels_last) {
  constexpr const char* op = "soft_split_backward";
  check_dtype(op, "grad_out", grad_out_in);
  const Geometry g = make_geometry(op, input_size, kernel_size, stride, padding);
  check_grad_out(op, "cpp", grad_out_in, g, input_size);
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_x = empty_grad_x(input_size, grad_out.options(), channels_last);
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "soft_split_backward_cpu",
                                  [&] {
                                    fold_impl(grad_out.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), g,
                                              channels_last);
                                  });
  return grad_x;
}

// ---- soft split + layer norm ---------------------------------------------------------------------------------------
// Forward: gather a row of windows into the output as the soft split does, then normalise each of its tokens while
// it is in cache, so the raw (B, L, C*kh*kw) soft split never makes a round trip through memory; mean and rstd (B, L)
// are kept (in acc_t) for backward. Backward: per row of windows, re-gather the tokens u from x and compute, in acc_t,
//   grad_u = rstd * (g*w - mean_f(g*w) - xhat * mean_f(g*w*xhat)),  xhat = (u - mean) * rstd,
// plus that row's partial sums of g*xhat and g (the weight and bias gradients). The partials are summed in row order,
// so the result does not depend on the number of threads; grad_u folds into grad_x as in soft_split_backward.

// The per-token math, compiled per instruction set (isa.h): plain loops over the features that auto-vectorise.
template <typename T, typename acc_t>
struct NormalizeTokens {  // n tokens of F features in place, and their mean and rstd
  // Four tokens at a time: their sums are four independent chains (one token's reduction is latency-bound at these
  // widths); each token's own order of summation is the same either way.
  static T2T_INLINE void run(T* tokens, int64_t n, int64_t F, const acc_t* w, const acc_t* b, acc_t eps, acc_t* mean,
                             acc_t* rstd) {
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      T *u0 = tokens + t * F, *u1 = u0 + F, *u2 = u1 + F, *u3 = u2 + F;
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t f = 0; f < F; ++f) {
        s0 += static_cast<acc_t>(u0[f]);
        s1 += static_cast<acc_t>(u1[f]);
        s2 += static_cast<acc_t>(u2[f]);
        s3 += static_cast<acc_t>(u3[f]);
      }
      const acc_t m0 = s0 / static_cast<acc_t>(F), m1 = s1 / static_cast<acc_t>(F), m2 = s2 / static_cast<acc_t>(F),
                  m3 = s3 / static_cast<acc_t>(F);
      acc_t q0 = 0, q1 = 0, q2 = 0, q3 = 0;
#pragma omp simd reduction(+ : q0, q1, q2, q3)
      for (int64_t f = 0; f < F; ++f) {
        const acc_t d0 = static_cast<acc_t>(u0[f]) - m0, d1 = static_cast<acc_t>(u1[f]) - m1,
                    d2 = static_cast<acc_t>(u2[f]) - m2, d3 = static_cast<acc_t>(u3[f]) - m3;
        q0 += d0 * d0;
        q1 += d1 * d1;
        q2 += d2 * d2;
        q3 += d3 * d3;
      }
      const acc_t mus[4] = {m0, m1, m2, m3}, sqs[4] = {q0, q1, q2, q3};
      T* us[4] = {u0, u1, u2, u3};
      for (int g = 0; g < 4; ++g) normalize_token(us[g], F, w, b, mus[g], sqs[g], eps, mean + t + g, rstd + t + g);
    }
    for (; t < n; ++t) {
      T* u = tokens + t * F;
      acc_t sum = 0, sq = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t f = 0; f < F; ++f) sum += static_cast<acc_t>(u[f]);
      const acc_t mu = sum / static_cast<acc_t>(F);
#pragma omp simd reduction(+ : sq)
      for (int64_t f = 0; f < F; ++f) {
        const acc_t d = static_cast<acc_t>(u[f]) - mu;
        sq += d * d;
      }
      normalize_token(u, F, w, b, mu, sq, eps, mean + t, rstd + t);
    }
  }

  // u = (u - mu) * rstd * w + b, rstd from the sum of squared deviations sq
  static T2T_INLINE void normalize_token(T* u, int64_t F, const acc_t* w, const acc_t* b, acc_t mu, acc_t sq,
                                         acc_t eps, acc_t* mean, acc_t* rstd) {
    const acc_t rs = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(F) + eps);
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) u[f] = static_cast<T>((static_cast<acc_t>(u[f]) - mu) * rs * w[f] + b[f]);
    *mean = mu;
    *rstd = rs;
  }
};

template <typename T, typename acc_t>
struct TokenGrads {  // grad_u of n tokens, and their g*xhat and g added to partial[0:F] and partial[F:2F]
  // The reductions of four tokens at a time, as NormalizeTokens: four independent chains (one token's are
  // latency-bound at these widths: stage 0's backward took 10.5 ms one token at a time, 7.4 four at a time)
  static T2T_INLINE void run(const T* grad_out, const T* tokens, const acc_t* w, const acc_t* mean, const acc_t* rstd,
                             int64_t n, int64_t F, acc_t* grad_u, acc_t* partial) {
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      const T *g0 = grad_out + t * F, *g1 = g0 + F, *g2 = g1 + F, *g3 = g2 + F;
      const T *u0 = tokens + t * F, *u1 = u0 + F, *u2 = u1 + F, *u3 = u2 + F;
      const acc_t m0 = mean[t], m1 = mean[t + 1], m2 = mean[t + 2], m3 = mean[t + 3];
      const acc_t r0 = rstd[t], r1 = rstd[t + 1], r2 = rstd[t + 2], r3 = rstd[t + 3];
      acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, c0 = 0, c1 = 0, c2 = 0, c3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, c0, c1, c2, c3)
      for (int64_t f = 0; f < F; ++f) {
        const acc_t gw0 = static_cast<acc_t>(g0[f]) * w[f], gw1 = static_cast<acc_t>(g1[f]) * w[f],
                    gw2 = static_cast<acc_t>(g2[f]) * w[f], gw3 = static_cast<acc_t>(g3[f]) * w[f];
        a0 += gw0;
        a1 += gw1;
        a2 += gw2;
        a3 += gw3;
        c0 += gw0 * ((static_cast<acc_t>(u0[f]) - m0) * r0);
        c1 += gw1 * ((static_cast<acc_t>(u1[f]) - m1) * r1);
        c2 += gw2 * ((static_cast<acc_t>(u2[f]) - m2) * r2);
        c3 += gw3 * ((static_cast<acc_t>(u3[f]) - m3) * r3);
      }
      const acc_t sums[4][2] = {{a0, c0}, {a1, c1}, {a2, c2}, {a3, c3}};
      for (int k = 0; k < 4; ++k)
        token_grad(grad_out + (t + k) * F, tokens + (t + k) * F, w, mean[t + k], rstd[t + k], F, sums[k][0],
                   sums[k][1], grad_u ? grad_u + (t + k) * F : nullptr, partial);
    }
    for (; t < n; ++t) {
      const T* go = grad_out + t * F;
      const T* u = tokens + t * F;
      const acc_t mu = mean[t], rs = rstd[t];
      acc_t sum_gw = 0, sum_gwx = 0;
#pragma omp simd reduction(+ : sum_gw, sum_gwx)
      for (int64_t f = 0; f < F; ++f) {
        const acc_t gw = static_cast<acc_t>(go[f]) * w[f];
        sum_gw += gw;
        sum_gwx += gw * ((static_cast<acc_t>(u[f]) - mu) * rs);
      }
      token_grad(go, u, w, mu, rs, F, sum_gw, sum_gwx, grad_u ? grad_u + t * F : nullptr, partial);
    }
  }

  // gu = rs * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) from the two sums (gu null: not wanted); partial += (g*xhat, g)
  static T2T_INLINE void token_grad(const T* go, const T* u, const acc_t* w, acc_t mu, acc_t rs, int64_t F,
                                    acc_t sum_gw, acc_t sum_gwx, acc_t* gu, acc_t* partial) {
    acc_t* pw = partial;
    acc_t* pb = partial + F;
    if (gu != nullptr) {
      const acc_t a = sum_gw / static_cast<acc_t>(F), c = sum_gwx / static_cast<acc_t>(F);
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) {
        const acc_t gf = static_cast<acc_t>(go[f]), xhat = (static_cast<acc_t>(u[f]) - mu) * rs;
        gu[f] = rs * (gf * w[f] - a - xhat * c);
        pw[f] += gf * xhat;
        pb[f] += gf;
      }
      return;
    }
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const acc_t gf = static_cast<acc_t>(go[f]);
      pw[f] += gf * ((static_cast<acc_t>(u[f]) - mu) * rs);
      pb[f] += gf;
    }
  }
};

template <typename T>
void soft_split_layer_norm_forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                        at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, const Geometry& g,
                                        double eps) {
  using acc_t = acc_type<T>;
  const acc_t* w = weight.const_data_ptr<acc_t>();
  const acc_t* b = bias.const_data_ptr<acc_t>();
  T* op = out.mutable_data_ptr<T>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* rp = rstd.mutable_data_ptr<acc_t>();
  const int64_t row = g.ow * g.F();
  const auto normalize = isa_variant<NormalizeTokens<T, acc_t>>(cpu_isa());
  at::parallel_for(0, g.B * g.oh, window_row_grain(g), [&](int64_t begin, int64_t end) {
    RowGatherer<T> gather(x, g);
    for (int64_t r = begin; r < end; ++r) {
      gather(r, op + r * row);
      normalize(op + r * row, g.ow, g.F(), w, b, static_cast<acc_t>(eps), mp + r * g.ow, rp + r * g.ow);
    }
  });
}

template <typename T>
void soft_split_layer_norm_backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& grad_u,
                                         at::Tensor& partials, const Geometry& g) {
  using acc_t = acc_type<T>;
  const int64_t F = g.F(), row = g.ow * F;
  const T* gp = grad_out.const_data_ptr<T>();
  const acc_t* w = weight.const_data_ptr<acc_t>();
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* rp = rstd.const_data_ptr<acc_t>();
  acc_t* gup = grad_u.defined() ? grad_u.mutable_data_ptr<acc_t>() : nullptr;  // undefined: no grad_x wanted
  acc_t* pp = partials.mutable_data_ptr<acc_t>();
  const auto token_grads = isa_variant<TokenGrads<T, acc_t>>(cpu_isa());
  at::parallel_for(0, g.B * g.oh, window_row_grain(g), [&](int64_t begin, int64_t end) {
    RowGatherer<T> gather(x, g);
    std::vector<T> tokens(row);
    for (int64_t r = begin; r < end; ++r) {
      gather(r, tokens.data());
      acc_t* partial = pp + r * 2 * F;  // this row of windows' sums of g*xhat, then of g
      std::fill(partial, partial + 2 * F, acc_t(0));
      const int64_t n = r * g.ow;  // its first token
      token_grads(gp + n * F, tokens.data(), w, mp + n, rp + n, g.ow, F, gup ? gup + n * F : nullptr, partial);
    }
  });
}

// ---- soft split + layer norm + linear (inference) ------------------------------------------------------------------
// out (B, L, N) = layer_norm(soft_split(x)) W^T + b: what the T2T layers compute from the image up to their first
// product (norm1 -> kqv). A task gathers and normalises a few rows of windows in per-thread scratch, as above, and
// multiplies their tokens there by W^T (packed (F, Np), zero beyond N) with tiles.h's register-blocked gemm_tiles, the
// bias added in its epilogue: neither the split nor the normalised tokens reach memory. Each token's products sum over
// the features in order, so the result does not depend on the number of threads. float32/float64; forward only.

template <typename T>
struct SplitNormLinearArgs {
  const at::Tensor* x;
  const Geometry* g;
  const T *norm_weight, *norm_bias;
  const T *wt, *bias;  // W^T (F, Np) and the bias (Np), zero beyond N
  T* out;              // (B, L, N) contiguous
  int64_t N, Np, rows;  // rows of windows per task
  T eps;
};

// rows of windows per task: about 64 tokens, so that the products' row tiles are mostly whole (28 tokens a row at
// stage 2 would leave a tile half empty) and each tile of W^T read from L2 serves many tokens
inline int64_t split_norm_linear_rows(const Geometry& g) { return std::max<int64_t>(1, (64 + g.ow / 2) / g.ow); }

// per-task scratch (in T): the task's tokens (n, F), their mean and rstd, and where N < Np the output rows (n, Np)
int64_t split_norm_linear_scratch(const Geometry& g, int64_t N, int64_t Np) {
  const int64_t n = split_norm_linear_rows(g) * g.ow;
  return n * g.F() + 2 * n + (N < Np ? n * Np : 0);
}

// the products' register tile: 8 tokens x 3 vectors with AVX-512's 32 registers (measured 1% and 6% faster than 8 x 2
// at the model's 147 -> 192 and 576 -> 192), the instruction set's usual tile otherwise
template <class I>
constexpr int kSplitNormLinearCols = std::is_same_v<I, IsaAvx512> ? 3 : I::C1;
constexpr int64_t kL1PanelBytes = 32 << 10;  // a column panel of W^T at most this size stays in L1 (48 KB and up)

template <class I>
struct SplitNormLinearTask {
  template <typename T>
  static T2T_INLINE void run(const SplitNormLinearArgs<T>* a, int64_t task, int64_t, T* scratch) {
    const Geometry& g = *a->g;
    const int64_t F = g.F(), N = a->N, Np = a->Np, r0 = task * a->rows;
    const int64_t n = (std::min(r0 + a->rows, g.B * g.oh) - r0) * g.ow;  // tokens of rows r0.. (consecutive in out)
    T *tokens = scratch, *mean = tokens + n * F, *rstd = mean + n, *staged = rstd + n;
    RowGatherer<T> gather(*a->x, g);
    for (int64_t t = 0; t < n; t += g.ow) gather(r0 + t / g.ow, tokens + t * F);
    NormalizeTokens<T, T>::run(tokens, n, F, a->norm_weight, a->norm_bias, a->eps, mean, rstd);
    T* dst = a->out + r0 * g.ow * N;
    const bool direct = N == Np;
    Prefetcher none;
    // one tile's column panel of W^T at a time over all the tokens where the panel fits in L1 (stage 0's 147 x 48:
    // 4-7% faster than sweeping every panel for each row tile), else every panel per row tile (stage 1's 576 x 48
    // fits neither way: the same time)
    const int64_t panel = kSplitNormLinearCols<I> * Simd<T, I::kBytes>::kLanes;
    const int64_t cols = F * panel * static_cast<int64_t>(sizeof(T)) <= kL1PanelBytes ? panel : Np;
    T* out = direct ? dst : staged;
    for (int64_t c0 = 0; c0 < Np; c0 += cols)
      gemm_tiles<I, I::R1, kSplitNormLinearCols<I>, Epilogue::kPlusX>(tokens, F, n, F, a->wt + c0, Np, cols, out + c0,
                                                                      direct ? N : Np, static_cast<const T*>(nullptr),
                                                                      a->bias + c0, 0, none, false);
    if (!direct)
      for (int64_t t = 0; t < n; ++t) std::copy_n(staged + t * Np, N, dst + t * N);
  }
};

void check_param(const char* op, const char* name, const at::Tensor& t, const Geometry& g) {
  check_dtype(op, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == g.F(), op, " (cpp): ", name, " must be (C*kh*kw,) = (", g.F(),
              ",), got shape ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_split_layer_norm_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, double eps) {
  constexpr const char* op = "soft_split_layer_norm";
  TORCH_CHECK(x.dim() == 4, op, " (cpp): x must be 4-D (B, C, H, W), got shape ", x.sizes());
  check_dtype(op, "x", x);
  const Geometry g = make_geometry(op, x.sizes(), kernel_size, stride, padding);
  check_param(op, "weight", weight, g);
  check_param(op, "bias", bias, g);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, " (cpp): eps must be finite and non-negative, got ", eps);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({g.B, g.L(), g.F()}, x.options());
  at::Tensor mean = at::empty({g.B, g.L()}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({g.B, g.L()}, x.options().dtype(acc));
  if (out.numel() == 0) return {out, mean, rstd};
  const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "soft_split_layer_norm_cpu",
                                  [&] { soft_split_layer_norm_forward_impl<scalar_t>(x, w, b, out, mean, rstd, g, eps); });
  return {out, mean, rstd};
}

at::Tensor soft_split_layer_norm_linear_cpu(const at::Tensor& x, const at::Tensor& norm_weight,
                                            const at::Tensor& norm_bias, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias_in, at::IntArrayRef kernel_size,
                                            at::IntArrayRef stride, at::IntArrayRef padding, double eps) {
  constexpr const char* op = "soft_split_layer_norm_linear";
  TORCH_CHECK(x.dim() == 4, op, " (cpp): x must be 4-D (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, " (cpp): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (cpp): x must be float32 or float64, got ", x.scalar_type());
  const Geometry g = make_geometry(op, x.sizes(), kernel_size, stride, padding);
  check_param(op, "norm_weight", norm_weight, g);
  check_param(op, "norm_bias", norm_bias, g);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == g.F(), op, " (cpp): weight must be (N, C*kh*kw) = (N, ", g.F(),
              "), got shape ", weight.sizes());
  const int64_t N = weight.size(0);
  const at::Tensor bias = bias_in.has_value() ? *bias_in : at::Tensor();
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == N), op, " (cpp): bias must be (N,) = (", N,
              ",) for weight of shape ", weight.sizes(), ", got shape ", bias.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"norm_weight", norm_weight},
                                {"norm_bias", norm_bias}, {"weight", weight}, {"bias", bias}}) {
    TORCH_CHECK(!t.defined() || (t.scalar_type() == x.scalar_type() && t.device().is_cpu()), op, " (cpp): ", name,
                " must be a CPU tensor of x's dtype ", x.scalar_type(), ", got ", t.scalar_type(), " on ",
                t.device());
  }
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, " (cpp): eps must be finite and non-negative, got ", eps);
  at::Tensor out = at::empty({g.B, g.L(), N}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_split_layer_norm_linear_cpu", [&] {
    // columns padded to whole register tiles of the widest instruction set (every set's tiles divide them)
    constexpr int64_t block = kSplitNormLinearCols<IsaAvx512> * IsaAvx512::kBytes / sizeof(scalar_t);
    const int64_t Np = (N + block - 1) / block * block;
    at::Tensor wt = at::zeros({g.F(), Np}, x.options()), b = at::zeros({Np}, x.options());
    wt.narrow(1, 0, N).copy_(weight.t());
    if (bias.defined()) b.narrow(0, 0, N).copy_(bias);
    const at::Tensor nw = norm_weight.contiguous(), nb = norm_bias.contiguous();
    const SplitNormLinearArgs<scalar_t> args{&x, &g, nw.const_data_ptr<scalar_t>(), nb.const_data_ptr<scalar_t>(),
                                             wt.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                             out.mutable_data_ptr<scalar_t>(), N, Np, split_norm_linear_rows(g),
                                             static_cast<scalar_t>(eps)};
    const int64_t tasks = (g.B * g.oh + args.rows - 1) / args.rows;
    parallel_isa_tasks<SplitNormLinearTask>(cpu_isa(), args, tasks, split_norm_linear_scratch(g, N, Np));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_split_layer_norm_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    bool channels_last, bool x_grad) {
  constexpr const char* op = "soft_split_layer_norm_backward";
  TORCH_CHECK(x.dim() == 4, op, " (cpp): x must be 4-D (B, C, H, W), got shape ", x.sizes());
  check_dtype(op, "x", x);
  check_dtype(op, "grad_out", grad_out_in);
  TORCH_CHECK(grad_out_in.scalar_type() == x.scalar_type(), op, " (cpp): grad_out must have x's dtype ",
              x.scalar_type(), ", got ", grad_out_in.scalar_type());
  const Geometry g = make_geometry(op, x.sizes(), kernel_size, stride, padding);
  check_grad_out(op, "cpp", grad_out_in, g, x.sizes());
  check_param(op, "weight", weight, g);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean_in}, {"rstd", rstd_in}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == g.B && t.size(1) == g.L() && t.scalar_type() == acc, op, " (cpp): ",
                name, " must be (B, L) = (", g.B, ", ", g.L(), ") of dtype ", acc, ", got shape ", t.sizes(),
                " of dtype ", t.scalar_type());
  }
  at::Tensor grad_x = x_grad ? empty_grad_x(x.sizes(), x.options(), channels_last) : at::empty({0}, x.options());
  at::Tensor grad_weight = at::zeros({g.F()}, x.options().dtype(acc));
  at::Tensor grad_bias = at::zeros({g.F()}, x.options().dtype(acc));
  if (grad_out_in.numel() == 0) {
    grad_x.zero_();
    return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
  }
  const at::Tensor grad_out = grad_out_in.contiguous(), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = weight.to(acc).contiguous();
  // the gradient of the raw tokens, folded into grad_x; without x_grad only the parameters' partial sums are formed
  at::Tensor grad_u = x_grad ? at::empty({g.B, g.L(), g.F()}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor partials = at::empty({g.B * g.oh, 2, g.F()}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "soft_split_layer_norm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    soft_split_layer_norm_backward_impl<scalar_t>(grad_out, x, w, mean, rstd, grad_u, partials, g);
    if (x_grad) fold_impl(grad_u.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(), g, channels_last);
  });
  // the rows' partial sums, added in row order: a fixed order whatever the number of threads
  const at::Tensor sums = partials.view({g.B * g.oh, 2 * g.F()});
  AT_DISPATCH_FLOATING_TYPES(acc, "soft_split_layer_norm_param_grads", [&] {
    const scalar_t* p = sums.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    const int64_t rows = sums.size(0), F = g.F();
    at::parallel_for(0, 2 * F, 64, [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f) {
        scalar_t s = 0;
        for (int64_t r = 0; r < rows; ++r) s += p[r * 2 * F + f];
        (f < F ? gw[f] : gb[f - F]) = s;
      }
    });
  });
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, CPU, m) {
  m.impl("soft_split", &soft_split_cpu);
  m.impl("soft_split_backward", &soft_split_backward_cpu);
  m.impl("soft_split_layer_norm", &soft_split_layer_norm_cpu);
  m.impl("soft_split_layer_norm_backward", &soft_split_layer_norm_backward_cpu);
  m.impl("soft_split_layer_norm_linear", &soft_split_layer_norm_linear_cpu);
}

}  // namespace t2t_kernels
