// CUDA kernels of t2t_kernels::soft_split and its backward (DESIGN §4); fp32, fp16, bf16.
//
// Forward: a block row of threads (threadIdx.y) owns one output row (b, l) = one window, its threads (threadIdx.x)
// walk the C*kh*kw features, so consecutive threads store consecutive addresses (coalesced writes); each loads
// x[b, c, oy*sh - ph + i, ox*sw - pw + j] through x's strides (contiguous, channels_last or the token view), zero in
// the padding. The model's 7x7 and 3x3 kernels are template parameters, so the feature decomposition divides by
// constants.
// Backward, as a gather: one thread per element of grad_x (contiguous or channels_last, so stores are coalesced)
// sums the <= ceil(kh/sh) * ceil(kw/sw) windows covering it in fp32, kernel row then column ascending (ATen's col2im
// order). No atomics: deterministic.
// Index math is int32 when every offset fits, int64 otherwise. Only valid (in-image) offsets are ever formed.
// (No ATen/cuda/CUDAContext.h: it pulls cusparse.h, which not every toolkit install has.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../soft_split_geometry.h"

#include <algorithm>
#include <cstdint>
#include <limits>

namespace t2t_kernels {
namespace {

using soft_split_detail::check_grad_out;
using soft_split_detail::empty_grad_x;
using soft_split_detail::Geometry;
using soft_split_detail::make_geometry;

void check_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, " (cuda): ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

// Kernel parameters in the index type the kernel computes in.
template <typename index_t>
struct Params {
  index_t B, C, H, W, kh, kw, sh, sw, ph, pw, oh, ow;
  index_t sB, sC, sH, sW;  // strides of x (forward only)
};

template <typename index_t>
Params<index_t> to_params(const Geometry& g, at::IntArrayRef strides) {
  Params<index_t> p{};
  p.B = g.B, p.C = g.C, p.H = g.H, p.W = g.W, p.kh = g.kh, p.kw = g.kw, p.sh = g.sh, p.sw = g.sw;
  p.ph = g.ph, p.pw = g.pw, p.oh = g.oh, p.ow = g.ow;
  if (!strides.empty()) p.sB = strides[0], p.sC = strides[1], p.sH = strides[2], p.sW = strides[3];
  return p;
}

bool fits_int32(int64_t n) { return n < std::numeric_limits<int32_t>::max(); }

// largest element offset + 1 that x's strides can reach
int64_t strided_extent(const at::Tensor& x) {
  int64_t extent = 1;
  for (int64_t d = 0; d < x.dim(); ++d) extent += (x.size(d) - 1) * x.stride(d);
  return extent;
}

int64_t grid_size(int64_t work, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, int64_t(1) << 20));
}

// ---- forward ----------------------------------------------------------------------------------------------------

template <typename T, typename index_t, int KH, int KW>
__global__ void soft_split_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, const Params<index_t> p) {
  const index_t kh = KH > 0 ? KH : p.kh, kw = KW > 0 ? KW : p.kw, kk = kh * kw;
  const index_t F = p.C * kk, L = p.oh * p.ow, rows = p.B * L;
  for (index_t row = index_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += index_t(gridDim.x) * blockDim.y) {
    const index_t b = row / L, l = row - b * L, oy = l / p.ow, ox = l - oy * p.ow;
    const index_t y0 = oy * p.sh - p.ph, x0 = ox * p.sw - p.pw;
    const T* xb = x + b * p.sB;
    T* o = out + row * F;
    for (index_t f = threadIdx.x; f < F; f += blockDim.x) {
      const index_t c = f / kk, r = f - c * kk, i = r / kw, j = r - i * kw;
      const index_t y = y0 + i, xx = x0 + j;
      T value = T(0);
      if (y >= 0 && y < p.H && xx >= 0 && xx < p.W) value = xb[c * p.sC + y * p.sH + xx * p.sW];
      o[f] = value;
    }
  }
}

template <typename T, typename index_t>
void launch_forward(const at::Tensor& x, at::Tensor& out, const Geometry& g, cudaStream_t stream) {
  const Params<index_t> p = to_params<index_t>(g, x.strides());
  const int64_t F = g.F();
  // threads along the features: a multiple of 32 in [32, 256] with the fewest idle lanes over the row
  int64_t tx = 32, best_waste = std::numeric_limits<int64_t>::max();
  for (int64_t t = 32; t <= 256; t += 32) {
    const int64_t waste = (F + t - 1) / t * t - F;
    if (waste < best_waste || (waste == best_waste && t <= F)) tx = t, best_waste = waste;
  }
  const int64_t ty = std::max<int64_t>(1, 256 / tx);
  const dim3 block(tx, ty), grid(grid_size(g.B * g.L(), ty));
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  if (g.kh == 7 && g.kw == 7)
    soft_split_fwd_kernel<T, index_t, 7, 7><<<grid, block, 0, stream>>>(xp, op, p);
  else if (g.kh == 3 && g.kw == 3)
    soft_split_fwd_kernel<T, index_t, 3, 3><<<grid, block, 0, stream>>>(xp, op, p);
  else
    soft_split_fwd_kernel<T, index_t, 0, 0><<<grid, block, 0, stream>>>(xp, op, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void forward_dtype(const at::Tensor& x, at::Tensor& out, const Geometry& g, cudaStream_t stream) {
  if (fits_int32(out.numel()) && fits_int32(strided_extent(x)))
    launch_forward<T, int32_t>(x, out, g, stream);
  else
    launch_forward<T, int64_t>(x, out, g, stream);
}

at::Tensor soft_split_cuda(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding) {
  constexpr const char* op = "soft_split";
  TORCH_CHECK(x.dim() == 4, op, " (cuda): x must be 4-D (B, C, H, W), got shape ", x.sizes());
  check_tensor(op, "x", x);
  const Geometry g = make_geometry(op, x.sizes(), kernel_size, stride, padding);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty({g.B, g.L(), g.F()}, x.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  switch (x.scalar_type()) {
    case at::kFloat: forward_dtype<float>(x, out, g, stream); break;
    case at::kHalf: forward_dtype<at::Half>(x, out, g, stream); break;
    case at::kBFloat16: forward_dtype<at::BFloat16>(x, out, g, stream); break;
    default: TORCH_CHECK(false, op, " (cuda): unsupported dtype ", x.scalar_type());
  }
  return out;
}

// ---- backward ---------------------------------------------------------------------------------------------------

template <typename T, typename index_t, bool kChannelsLast>
__global__ void soft_split_bwd_kernel(const T* __restrict__ grad_out, T* __restrict__ grad_x,
                                      const Params<index_t> p) {
  const index_t kk = p.kh * p.kw, F = p.C * kk, L = p.oh * p.ow, n = p.B * p.C * p.H * p.W;
  for (index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += index_t(gridDim.x) * blockDim.x) {
    index_t b, c, y, x, t;
    if (kChannelsLast) {
      c = idx % p.C, t = idx / p.C, x = t % p.W, t /= p.W, y = t % p.H, b = t / p.H;
    } else {
      x = idx % p.W, t = idx / p.W, y = t % p.H, t /= p.H, c = t % p.C, b = t / p.C;
    }
    // windows whose kernel row i = top - oy*sh is in [0, kh): descending oy is ascending i (same for columns)
    const index_t top = y + p.ph, left = x + p.pw;
    const index_t oy_hi = min(p.oh - 1, top / p.sh), oy_lo = top >= p.kh ? (top - p.kh) / p.sh + 1 : 0;
    const index_t ox_hi = min(p.ow - 1, left / p.sw), ox_lo = left >= p.kw ? (left - p.kw) / p.sw + 1 : 0;
    const T* gb = grad_out + b * L * F + c * kk;
    float acc = 0.f;
    for (index_t oy = oy_hi; oy >= oy_lo; --oy) {
      const index_t i = top - oy * p.sh;
      for (index_t ox = ox_hi; ox >= ox_lo; --ox) {
        const index_t j = left - ox * p.sw;
        acc += static_cast<float>(gb[(oy * p.ow + ox) * F + i * p.kw + j]);
      }
    }
    grad_x[idx] = static_cast<T>(acc);
  }
}

template <typename T, typename index_t>
void launch_backward(const at::Tensor& grad_out, at::Tensor& grad_x, const Geometry& g, bool channels_last,
                     cudaStream_t stream) {
  const Params<index_t> p = to_params<index_t>(g, {});
  constexpr int64_t kThreads = 256;
  const dim3 block(kThreads), grid(grid_size(grad_x.numel(), kThreads));
  const T* gp = grad_out.const_data_ptr<T>();
  T* xp = grad_x.mutable_data_ptr<T>();
  if (channels_last)
    soft_split_bwd_kernel<T, index_t, true><<<grid, block, 0, stream>>>(gp, xp, p);
  else
    soft_split_bwd_kernel<T, index_t, false><<<grid, block, 0, stream>>>(gp, xp, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void backward_dtype(const at::Tensor& grad_out, at::Tensor& grad_x, const Geometry& g, bool channels_last,
                    cudaStream_t stream) {
  if (fits_int32(grad_out.numel()) && fits_int32(grad_x.numel()))
    launch_backward<T, int32_t>(grad_out, grad_x, g, channels_last, stream);
  else
    launch_backward<T, int64_t>(grad_out, grad_x, g, channels_last, stream);
}

at::Tensor soft_split_backward_cuda(const at::Tensor& grad_out_in, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    bool channels_last) {
  constexpr const char* op = "soft_split_backward";
  check_tensor(op, "grad_out", grad_out_in);
  const Geometry g = make_geometry(op, input_size, kernel_size, stride, padding);
  check_grad_out(op, "cuda", grad_out_in, g, input_size);
  const c10::cuda::CUDAGuard device_guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_x = empty_grad_x(input_size, grad_out.options(), channels_last);
  if (grad_x.numel() == 0) return grad_x;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad_out.device().index()).stream();
  switch (grad_out.scalar_type()) {
    case at::kFloat: backward_dtype<float>(grad_out, grad_x, g, channels_last, stream); break;
    case at::kHalf: backward_dtype<at::Half>(grad_out, grad_x, g, channels_last, stream); break;
    case at::kBFloat16: backward_dtype<at::BFloat16>(grad_out, grad_x, g, channels_last, stream); break;
    default: TORCH_CHECK(false, op, " (cuda): unsupported dtype ", grad_out.scalar_type());
  }
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, CUDA, m) {
  m.impl("soft_split", &soft_split_cuda);
  m.impl("soft_split_backward", &soft_split_backward_cuda);
}

}  // namespace t2t_kernels
