"""soft_split_layer_norm: the soft split and the LayerNorm that follows it (norm1 of the next T2T layer) as one op.

The raw soft split never reaches memory: each row of windows is gathered and its tokens normalised while they are in
cache. Forward keeps only x and the per-token mean and rstd (B, L); backward re-gathers the tokens from x, so saving
for backward costs the input, not the (k/s)^2-times larger split. Backends: "eager" (reference.py), "cpp" (the
compiled op t2t_kernels::soft_split_layer_norm, csrc/cpu/soft_split.cpp), "triton" (t2t_kernels::
soft_split_layer_norm_triton, triton.py). There is no fused CUDA kernel: backend="cuda" runs the CUDA soft split and
torch's layer_norm. Under torch.compile on a GPU, "auto" takes the eager formula, whose inductor code measured
faster (BACKENDS below). Outputs are in x's dtype with statistics in fp32; weight and bias may be fp32 for a
low-precision x (autocast keeps parameters fp32), and their gradients come back in their own dtype.

soft_split_layer_norm_linear goes one product further, to what a T2T layer computes from the image up to its kqv
projection: linear(layer_norm(soft_split(x))). Its CPU kernel (t2t_kernels::soft_split_layer_norm_linear) multiplies
a few rows of windows' normalised tokens at a time by the weight while they are in cache, so they never reach memory
(T2T-ViT-14 at B=8: 14.7 MB written and read again at stage 0, the image's split). Forward only, for inference: with a gradient wanted it recomputes
the eager formula in backward; the layers take it only without one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backends import OpBackends, is_explicit
from .._registry import (check_eps, needs_eager_autodiff, op_exists, recompute_grads, register_recompute_autograd,
                         to_pair)
from ..soft_split import BACKENDS as SOFT_SPLIT_BACKENDS
from ..soft_split import check_soft_split_args, grad_is_channels_last, soft_split
from . import reference

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = OpBackends(
    name="soft_split_layer_norm",
    dtypes={"cpp": _FLOATS + (torch.float64,), "triton": _FLOATS},
    auto_order={"cuda": ("triton",), "cpu": ("cpp",)},
    # under torch.compile on a GPU, inductor's code for the eager formula (gather + LayerNorm fused with its
    # neighbours, and recomputed inside the backward's kernels) beat the Triton kernels: H100, bf16, T2T-ViT-14's
    # train step at B=128, the Triton op's calls 3.0 ms a step (profiled) against ~1.8 ms of inductor's kernels;
    # compile-fused went from 35.6 to 31.0 ms (host-bound runs) with memory unchanged (BENCHMARKS.md)
    compiled_auto_order={"cuda": ()},
)


def _check_param(name: str, t, x: Tensor, features: int, op: str = "soft_split_layer_norm") -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point Tensor or None, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != (features,):
        raise ValueError(f"{op}: {name} must have shape (C*kh*kw,) = ({features},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_composed_backend(backend: str, x: Tensor, op: str) -> None:
    """backend='cuda' (the CUDA soft split, then torch's layer_norm) or, for the Linear op, 'triton' (this file's
    op, then the product): raises in `op`'s name where the part that needs a kernel cannot take x."""
    part = SOFT_SPLIT_BACKENDS if backend == "cuda" else BACKENDS
    reason = part.unavailable_reason(backend, x.device, x.dtype)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {reason}")


def soft_split_layer_norm(x: Tensor, kernel_size, stride, padding, weight: Tensor | None = None,
                          bias: Tensor | None = None, eps: float = 1e-5, backend: str | None = None) -> Tensor:
    """``F.layer_norm(soft_split(x, kernel_size, stride, padding), (C*kh*kw,), weight, bias, eps)`` in one pass.

    x is (B, C, H, W) with any strides (as for soft_split); weight and bias are (C*kh*kw,) or None. Returns the
    normalised tokens (B, L, C*kh*kw), contiguous, in x's dtype.
    backend: "eager", "cpp", "cuda", "triton", or None/"auto" for the best one available for x.
    """
    k, s, p = to_pair(kernel_size, "kernel_size"), to_pair(stride, "stride"), to_pair(padding, "padding")
    check_soft_split_args(x, k, s, p, op="soft_split_layer_norm")
    features = x.shape[1] * k[0] * k[1]
    _check_param("weight", weight, x, features)
    _check_param("bias", bias, x, features)
    check_eps(eps, "soft_split_layer_norm")
    if backend == "cuda":  # no fused CUDA kernel: the CUDA soft split, then torch's layer norm
        _check_composed_backend(backend, x, "soft_split_layer_norm")
        return reference.layer_norm(soft_split(x, k, s, p, backend="cuda"), weight, bias, eps)
    name = BACKENDS.resolve(backend, x)
    if name == "eager" or needs_eager_autodiff(x, weight, bias):
        return reference.soft_split_layer_norm(x, k, s, p, weight, bias, eps)
    # the kernels return both parameter gradients in one dtype: give the parameters a common one, so an fp32 bias
    # beside a missing or low-precision weight keeps an fp32 gradient
    dtypes = [t.dtype for t in (weight, bias) if t is not None] or [x.dtype]
    param_dtype = torch.promote_types(dtypes[0], dtypes[-1])
    weight = weight.to(param_dtype) if weight is not None else x.new_ones(features, dtype=param_dtype)
    bias = bias.to(param_dtype) if bias is not None else x.new_zeros(features, dtype=param_dtype)
    op = (torch.ops.t2t_kernels.soft_split_layer_norm_triton if name == "triton"
          else torch.ops.t2t_kernels.soft_split_layer_norm)
    return op(x, weight, bias, k, s, p, float(eps))[0]


LINEAR_BACKENDS = OpBackends(
    name="soft_split_layer_norm_linear",
    dtypes={"cpp": (torch.float32, torch.float64)},
    auto_order={"cpu": ("cpp",)},
    fuses=("soft_split_layer_norm",),
    follows_autocast=True,
)


def _check_linear_params(x: Tensor, features: int, weight, bias) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != features:
        raise ValueError(f"soft_split_layer_norm_linear: weight must be a 2-D Tensor (N, C*kh*kw) = (N, {features}) "
                         f"for x of shape {tuple(x.shape)}, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"soft_split_layer_norm_linear: bias must be None or a Tensor of shape ({weight.shape[0]},) "
                         f"for weight {tuple(weight.shape)}, got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"soft_split_layer_norm_linear: {name} is on {t.device} but x is on {x.device}")


def soft_split_layer_norm_linear(x: Tensor, kernel_size, stride, padding, norm_weight: Tensor | None,
                                 norm_bias: Tensor | None, weight: Tensor, bias: Tensor | None = None,
                                 eps: float = 1e-5, backend: str | None = None) -> Tensor:
    """``F.linear(soft_split_layer_norm(x, kernel_size, stride, padding, norm_weight, norm_bias, eps), weight, bias)``.

    x (B, C, H, W) with any strides; norm_weight and norm_bias (C*kh*kw,) or None; weight (N, C*kh*kw) and bias (N,)
    or None, as nn.Linear keeps them. Returns (B, L, N), contiguous, in x's dtype.
    backend: "eager" (the formula), "cpp" (the fused CPU kernel: float32 and float64, every tensor in x's dtype), or
    None/"auto": cpp where it takes the input, else the formula on the best soft_split_layer_norm backend.
    """
    k, s, p = to_pair(kernel_size, "kernel_size"), to_pair(stride, "stride"), to_pair(padding, "padding")
    check_soft_split_args(x, k, s, p, op="soft_split_layer_norm_linear")
    features = x.shape[1] * k[0] * k[1]
    _check_param("norm_weight", norm_weight, x, features, "soft_split_layer_norm_linear")
    _check_param("norm_bias", norm_bias, x, features, "soft_split_layer_norm_linear")
    _check_linear_params(x, features, weight, bias)
    check_eps(eps, "soft_split_layer_norm_linear")
    params = (norm_weight, norm_bias, weight, bias)
    if backend in ("cuda", "triton"):  # no fused kernel there: that backend's split + norm, then the product
        _check_composed_backend(backend, x, "soft_split_layer_norm_linear")
        name = backend
    else:  # raises for a cpp that cannot take x, or a dtype nothing takes
        name = LINEAR_BACKENDS.resolve(backend, x)
    if backend == "eager":
        return reference.soft_split_layer_norm_linear(x, k, s, p, *params, eps)
    same_dtype = all(t is None or t.dtype == x.dtype for t in params)
    if name == "cpp" and not same_dtype and is_explicit(backend):
        names = ("x", "norm_weight", "norm_bias", "weight", "bias")
        raise TypeError("soft_split_layer_norm_linear: backend='cpp' takes every tensor in x's dtype, got "
                        + ", ".join(f"{n} {t.dtype}" for n, t in zip(names, (x, *params)) if t is not None))
    if name != "cpp" or not same_dtype:  # that backend's (or the best) split + norm, then the product
        return F.linear(soft_split_layer_norm(x, k, s, p, norm_weight, norm_bias, eps, backend=backend), weight, bias)
    if x.numel() == 0 or needs_eager_autodiff(x, *params):
        return reference.soft_split_layer_norm_linear(x, k, s, p, *params, eps)
    norm_weight = norm_weight if norm_weight is not None else x.new_ones(features)
    norm_bias = norm_bias if norm_bias is not None else x.new_zeros(features)
    return torch.ops.t2t_kernels.soft_split_layer_norm_linear(x, norm_weight, norm_bias, weight, bias, k, s, p,
                                                              float(eps))


@torch.library.custom_op("t2t_kernels::soft_split_layer_norm_triton", mutates_args=())
def _soft_split_layer_norm_triton(
    x: Tensor, weight: Tensor, bias: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from .triton import soft_split_layer_norm_forward

    return soft_split_layer_norm_forward(x, weight, bias, kernel_size, stride, padding, eps)


@torch.library.custom_op("t2t_kernels::soft_split_layer_norm_triton_backward", mutates_args=())
def _soft_split_layer_norm_triton_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, kernel_size: Sequence[int],
    stride: Sequence[int], padding: Sequence[int], channels_last: bool = False, x_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    from .triton import soft_split_layer_norm_backward

    return soft_split_layer_norm_backward(grad_out, x, weight, mean, rstd, kernel_size, stride, padding, channels_last,
                                          x_grad)


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(x, weight, bias, kernel_size, stride, padding, eps):
    B, C, H, W = x.shape
    oh, ow = reference.soft_split_reference.output_grid((H, W), kernel_size, stride, padding)
    stats = x.new_empty((B, oh * ow), dtype=statistics_dtype(x.dtype))
    return x.new_empty((B, oh * ow, C * kernel_size[0] * kernel_size[1])), stats, torch.empty_like(stats)


def _fake_backward(grad_out, x, weight, mean, rstd, kernel_size, stride, padding, channels_last=False, x_grad=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_x = x.new_empty(x.shape).contiguous(memory_format=fmt) if x_grad else x.new_empty(0)
    return grad_x, torch.empty_like(weight), torch.empty_like(weight)


def _register(suffix: str) -> None:
    forward = f"t2t_kernels::soft_split_layer_norm{suffix}"
    if not op_exists(forward):
        return
    backward_op = getattr(torch.ops.t2t_kernels, f"soft_split_layer_norm{suffix}_backward")
    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(f"{forward}_backward")(_fake_backward)

    def setup_context(ctx, inputs, output):
        x, weight, bias, ctx.kernel_size, ctx.stride, ctx.padding, ctx.eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.channels_last = grad_is_channels_last(x)

    def grad(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        geometry = (ctx.kernel_size, ctx.stride, ctx.padding)
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the fused backward op has no derivative of its own, so the gradient
            # comes from the reference under autograd, whose graph reaches x, weight and bias
            grad_x, grad_weight, grad_bias = recompute_grads(
                lambda x, weight, bias: reference.soft_split_layer_norm(x, *geometry, weight, bias, ctx.eps),
                (x, weight, bias), (), grad_out, ctx.needs_input_grad[:3])
        else:
            x_grad = ctx.needs_input_grad[0]  # the image into the first layer needs none: no fold then
            grad_x, grad_weight, grad_bias = backward_op(grad_out.contiguous(), x, weight, mean, rstd, *geometry,
                                                         ctx.channels_last, x_grad)
            grad_x = grad_x if x_grad else None
        return grad_x, grad_weight, grad_bias, None, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


_register("")
_register("_triton")


def _fake_linear(x, norm_weight, norm_bias, weight, bias, kernel_size, stride, padding, eps):
    B, _, H, W = x.shape
    oh, ow = reference.soft_split_reference.output_grid((H, W), kernel_size, stride, padding)
    return x.new_empty((B, oh * ow, weight.shape[0]))


if op_exists("t2t_kernels::soft_split_layer_norm_linear"):
    torch.library.register_fake("t2t_kernels::soft_split_layer_norm_linear")(_fake_linear)
    register_recompute_autograd("t2t_kernels::soft_split_layer_norm_linear",
                                reference.soft_split_layer_norm_linear_op, num_tensors=5)
