// linear(layer_norm(x)) and linear(gelu(h)) that keep x (h), not the Linear's input, for backward: the C++ autograd
// twins of t2t_kernels/layers/recompute.py's Python Function, for any device. A Python autograd Function costs a GPU
// train step host time it waits for (its apply and backward run Python; T2T-ViT-14 trains through about 40 such
// pairs); here the engine calls the backward directly. Same math as the Python path, op for op, so the same
// gradients: forward as eager (F.layer_norm / F.gelu, then F.linear, under the caller's autocast); backward
// recomputes the norm (GELU) once, casting as the forward's autocast did, and takes the Linear's and the norm's
// (GELU's) gradients from it. Double backward goes through these aten ops' own derivatives.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/onednn_linear.h"

namespace t2t_kernels {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor cast_to(const Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : t.to(dtype);
}

// float32 CPU products through oneDNN (cpu/onednn_linear.h), outside CPU autocast (whose casts at::linear applies)
// and double backward (the oneDNN op has no derivative); the weight's gradient stays ATen's (oneDNN would need
// transposed copies of both activations)
bool onednn_applies(const Tensor& x, const Tensor& weight) {
  return weight.scalar_type() == at::kFloat && !at::GradMode::is_enabled() &&
         !at::autocast::is_autocast_enabled(at::kCPU) && onednn_enabled_for(x);
}

Tensor linear_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  return onednn_applies(x, weight) ? onednn_linear(x.contiguous(), weight, bias.value_or(Tensor()))
                                   : at::linear(x, weight, bias);
}

// The Linear's gradients from grad_out and the input it consumed (a, before autocast's cast): weight and bias in the
// weight's dtype, a's in a's dtype; 2-D products on flat views.
struct LinearGrads {
  Tensor weight, bias, input;
};

LinearGrads linear_grads(const Tensor& grad_out, const Tensor& a, const Tensor& weight, bool needs_weight,
                         bool needs_bias, bool needs_input) {
  const auto dtype = grad_out.scalar_type();
  const Tensor g2 = grad_out.reshape({-1, grad_out.size(-1)});
  LinearGrads out;
  if (needs_weight) {
    const Tensor consumed = cast_to(a, dtype);  // autocast cast the Linear's input to the output's dtype
    out.weight = cast_to(g2.t().mm(consumed.reshape({-1, consumed.size(-1)})), weight.scalar_type());
  }
  if (needs_bias) out.bias = cast_to(g2.sum(0), weight.scalar_type());
  if (needs_input) {
    auto sizes = grad_out.sizes().vec();
    sizes.back() = weight.size(1);
    const Tensor w = cast_to(weight, dtype);  // g W = linear(g, W^T): oneDNN takes the transposed view as it is
    out.input = cast_to(onednn_applies(g2, w) ? onednn_linear(g2.contiguous(), w.t(), Tensor()) : g2.mm(w),
                        a.scalar_type()).view(sizes);
  }
  return out;
}

// Which gradients backward must compute. ctx->needs_input_grad counts only the Tensor arguments that are given (a
// missing optional one has no gradient edge), in argument order: the forward records each one's edge, or -1.
std::vector<int64_t> edges_of(std::initializer_list<bool> given) {
  std::vector<int64_t> edges;
  int64_t next = 0;
  for (bool g : given) edges.push_back(g ? next++ : -1);
  return edges;
}

bool needs_grad(AutogradContext* ctx, int64_t arg) {
  const int64_t edge = ctx->saved_data["edges"].toIntVector()[arg];
  return edge >= 0 && ctx->needs_input_grad(edge);
}

// autocast runs layer_norm in fp32 on CUDA (its fp32 list); CPU's autocast leaves it alone, as recompute.py's
// _AUTOCAST_LAYER_NORM_FP32 says
bool autocast_norm_to_fp32(const Tensor& x) {
  return x.is_cuda() && at::autocast::is_autocast_enabled(at::kCUDA);
}

class NormLinear : public torch::autograd::Function<NormLinear> {
 public:
  // backward returns one gradient per argument (the int list and eps included)
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& norm_weight,
                        const std::optional<Tensor>& norm_bias, at::IntArrayRef shape, double eps,
                        const Tensor& weight, const std::optional<Tensor>& bias) {
    const Tensor nw = norm_weight.value_or(Tensor()), nb = norm_bias.value_or(Tensor());
    const Tensor out = linear_forward(at::layer_norm(x, shape, nw, nb, eps), weight, bias);
    ctx->save_for_backward({x, nw, nb, weight});
    ctx->saved_data["shape"] = shape.vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["to_fp32"] = autocast_norm_to_fp32(x);
    ctx->saved_data["edges"] = edges_of({true, nw.defined(), nb.defined(), true, bias.has_value() && bias->defined()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &nw = saved[1], &nb = saved[2], &weight = saved[3];
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool to_fp32 = ctx->saved_data["to_fp32"].toBool();
    // a CPU backward can run in the forward's thread inside its autocast region: the casts below are autocast's
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto as_forward = [&](const Tensor& t) {  // what autocast handed layer_norm
      return to_fp32 && t.defined() && t.scalar_type() != at::kDouble ? cast_to(t, at::kFloat) : t;
    };
    const Tensor xc = as_forward(x), wc = as_forward(nw), bc = as_forward(nb);
    const bool needs_x = needs_grad(ctx, 0), needs_nw = needs_grad(ctx, 1), needs_nb = needs_grad(ctx, 2);
    const auto [a, mean, rstd] = at::native_layer_norm(xc, shape, wc, bc, eps);
    const LinearGrads g =
        linear_grads(grads[0], a, weight, needs_grad(ctx, 3), needs_grad(ctx, 4), needs_x || needs_nw || needs_nb);
    Tensor gx, gnw, gnb;
    if (g.input.defined()) {
      std::tie(gx, gnw, gnb) =
          at::native_layer_norm_backward(g.input, xc, shape, mean, rstd, wc, bc, {needs_x, needs_nw, needs_nb});
    }
    return {needs_x ? cast_to(gx, x.scalar_type()) : Tensor(), needs_nw ? cast_to(gnw, nw.scalar_type()) : Tensor(),
            needs_nb ? cast_to(gnb, nb.scalar_type()) : Tensor(), Tensor(), Tensor(), g.weight, g.bias};
  }
};

class GeluLinear : public torch::autograd::Function<GeluLinear> {
 public:
  // exact (erf) GELU; autocast leaves GELU in its input's dtype on every device
  static Tensor forward(AutogradContext* ctx, const Tensor& h, const Tensor& weight,
                        const std::optional<Tensor>& bias) {
    const Tensor out = linear_forward(at::gelu(h), weight, bias);
    ctx->save_for_backward({h, weight});
    ctx->saved_data["edges"] = edges_of({true, true, bias.has_value() && bias->defined()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &h = saved[0], &weight = saved[1];
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const LinearGrads g =
        linear_grads(grads[0], at::gelu(h), weight, needs_grad(ctx, 1), needs_grad(ctx, 2), needs_grad(ctx, 0));
    return {g.input.defined() ? at::gelu_backward(g.input, h) : Tensor(), g.weight, g.bias};
  }
};

Tensor norm_linear(const Tensor& x, const std::optional<Tensor>& norm_weight, const std::optional<Tensor>& norm_bias,
                   at::IntArrayRef normalized_shape, double eps, const Tensor& weight,
                   const std::optional<Tensor>& bias) {
  return NormLinear::apply(x, norm_weight, norm_bias, normalized_shape, eps, weight, bias);
}

Tensor gelu_linear(const Tensor& h, const Tensor& weight, const std::optional<Tensor>& bias) {
  return GeluLinear::apply(h, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, Autograd, m) {
  m.impl("norm_linear", &norm_linear);
  m.impl("gelu_linear", &gelu_linear);
}

}  // namespace t2t_kernels
