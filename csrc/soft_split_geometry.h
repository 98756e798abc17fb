// Shape checks, output geometry and grad_x allocation of t2t_kernels::soft_split, shared by the CPU and CUDA kernels
// so both give the same errors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace t2t_kernels {
namespace soft_split_detail {

struct Geometry {
  int64_t B, C, H, W, kh, kw, sh, sw, ph, pw, oh, ow;
  int64_t L() const { return oh * ow; }
  int64_t kk() const { return kh * kw; }
  int64_t F() const { return C * kh * kw; }
};

inline Geometry make_geometry(const char* op, at::IntArrayRef size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding must be pairs");
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1, op, ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(size.size() == 4, op, ": x must be 4-D (B, C, H, W), got size ", size);
  TORCH_CHECK(size[0] >= 0 && size[1] >= 1, op, ": x must have at least one channel, got size ", size);
  TORCH_CHECK(size[2] >= 1 && size[3] >= 1, op, ": x must be a non-empty image (height and width >= 1), got size ",
              size);
  Geometry g{size[0], size[1], size[2], size[3], kernel_size[0], kernel_size[1], stride[0], stride[1],
             padding[0], padding[1], 0, 0};
  TORCH_CHECK(g.ph <= (INT64_MAX / 4) && g.pw <= (INT64_MAX / 4) && g.kh <= (INT64_MAX / 4) &&
                  g.kw <= (INT64_MAX / 4),
              op, ": kernel_size ", kernel_size, " or padding ", padding, " is too large");
  const int64_t padded_h = g.H + 2 * g.ph, padded_w = g.W + 2 * g.pw;
  TORCH_CHECK(padded_h >= g.kh && padded_w >= g.kw, op, ": kernel_size ", kernel_size,
              " is larger than the padded input (H, W) + 2 * padding = (", padded_h, ", ", padded_w, ")");
  g.oh = (padded_h - g.kh) / g.sh + 1;
  g.ow = (padded_w - g.kw) / g.sw + 1;
  int64_t L = 0, rows = 0, F = 0, numel = 0;  // every product the kernels form must fit in int64
  TORCH_CHECK(!__builtin_mul_overflow(g.oh, g.ow, &L) && !__builtin_mul_overflow(g.B, L, &rows) &&
                  !__builtin_mul_overflow(g.C, g.kh * g.kw, &F) && !__builtin_mul_overflow(rows, F, &numel),
              op, ": the output size (B, L, C*kh*kw) overflows int64");
  return g;
}

// the backward's grad_out must be the forward's output shape for input_size
inline void check_grad_out(const char* op, const char* backend, const at::Tensor& grad_out, const Geometry& g,
                           at::IntArrayRef input_size) {
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == g.B && grad_out.size(1) == g.L() && grad_out.size(2) == g.F(),
              op, " (", backend, "): grad_out must be (B, L, C*kh*kw) = (", g.B, ", ", g.L(), ", ", g.F(),
              ") for input_size ", input_size, ", got shape ", grad_out.sizes());
}

// grad_x of input_size: contiguous, or channels_last memory (the token view's layout)
inline at::Tensor empty_grad_x(at::IntArrayRef input_size, const at::TensorOptions& options, bool channels_last) {
  return at::empty(input_size, options.memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous));
}

}  // namespace soft_split_detail
}  // namespace t2t_kernels
