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

#include <algorithm>
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

template <typename T>
void soft_split_forward_impl(const at::Tensor& x, at::Tensor& out, const Geometry& g) {
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t row = g.ow * g.F();  // output elements of one row of windows
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row));
  // channels innermost when C's stride is the smallest (C = 1 has nothing to gain from it)
  const bool cmajor = g.C > 1 && sC < sW;
  at::parallel_for(0, g.B * g.oh, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> zeros(cmajor ? g.C : 0, T(0));  // what a tap in the padding reads
    std::vector<const T*> taps(cmajor ? g.kk() : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.oh, oy = r % g.oh;
      const T* xb = xp + b * sB;
      T* o = op + r * row;
      if (cmajor) {
        if (g.kk() == 9)
          forward_row_cmajor<T, 9>(xb, o, g, oy, sC, sH, sW, zeros.data(), taps.data());
        else
          forward_row_cmajor<T, 0>(xb, o, g, oy, sC, sH, sW, zeros.data(), taps.data());
      } else if (g.kw == 7) {
        forward_row_wmajor<T, 7>(xb, o, g, oy, sC, sH, sW);
      } else if (g.kw == 3) {
        forward_row_wmajor<T, 3>(xb, o, g, oy, sC, sH, sW);
      } else {
        forward_row_wmajor<T, 0>(xb, o, g, oy, sC, sH, sW);
      }
    }
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
void soft_split_backward_impl(const at::Tensor& grad_out, at::Tensor& grad_x, const Geometry& g, bool channels_last) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T* gp = grad_out.const_data_ptr<T>();
  T* xp = grad_x.mutable_data_ptr<T>();
  const int64_t C = g.C, H = g.H, W = g.W;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * W));
  at::parallel_for(0, g.B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C * W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      const T* gb = gp + b * g.L() * g.F();
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (channels_last) {
        backward_row<T, acc_t, true, 0>(gb, acc.data(), g, y);
        T* dst = xp + r * W * C;  // (B, H, W, C) memory: row (b, y) is W*C contiguous elements
        for (int64_t n = 0; n < W * C; ++n) dst[n] = static_cast<T>(acc[n]);
      } else {
        if (g.kw == 7)
          backward_row<T, acc_t, false, 7>(gb, acc.data(), g, y);
        else if (g.kw == 3)
          backward_row<T, acc_t, false, 3>(gb, acc.data(), g, y);
        else
          backward_row<T, acc_t, false, 0>(gb, acc.data(), g, y);
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
                                  [&] { soft_split_backward_impl<scalar_t>(grad_out, grad_x, g, channels_last); });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, CPU, m) {
  m.impl("soft_split", &soft_split_cpu);
  m.impl("soft_split_backward", &soft_split_backward_cpu);
}

}  // namespace t2t_kernels
