"""soft_split: reshape + unfold + transpose in one pass (DESIGN §4), with its fold-as-gather backward.

Backends: "eager" (reference.py), "cpp" and "cuda" (the compiled op t2t_kernels::soft_split, csrc/), "triton"
(the op t2t_kernels::soft_split_triton, triton.py). All compiled ops share the fake kernels and autograd below.
The backward ops return grad_x channels_last when x is laid out so (the token view of the T2T module is), so the
tokens' gradient comes back contiguous; their own derivative is the forward op, so double backward works.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._backends import OpBackends
from .._registry import needs_eager_autodiff, op_exists, to_pair
from . import reference

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = OpBackends(
    name="soft_split",
    dtypes={"cpp": _FLOATS + (torch.float64,), "cuda": _FLOATS, "triton": _FLOATS},
    # CUDA before Triton: 1.3-1.8x faster at T2T-ViT's three splits, forward and forward+backward (H100, bf16, B=128,
    # BENCHMARKS.md 2026-11-26)
    auto_order={"cuda": ("cuda", "triton"), "cpu": ("cpp",)},
)


def check_soft_split_args(x: Tensor, kernel_size, stride, padding, op: str = "soft_split") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")
    if min(kernel_size) < 1:
        raise ValueError(f"{op}: kernel_size must be positive, got {tuple(kernel_size)}")
    if min(stride) < 1:
        raise ValueError(f"{op}: stride must be positive, got {tuple(stride)}")
    if min(padding) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {tuple(padding)}")
    if x.shape[1] < 1:
        raise ValueError(f"{op}: x must have at least one channel, got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:  # F.unfold rejects it too: every window would be padding
        raise ValueError(
            f"{op}: x must be a non-empty image, got height {x.shape[2]} and width {x.shape[3]} "
            f"(x shape {tuple(x.shape)})"
        )
    for n, k, p, name in zip(x.shape[2:], kernel_size, padding, ("height", "width")):
        if n + 2 * p < k:
            raise ValueError(
                f"{op}: kernel_size {tuple(kernel_size)} is larger than the padded input {name} "
                f"{n} + 2*{p} = {n + 2 * p} (x shape {tuple(x.shape)})"
            )


def soft_split(x: Tensor, kernel_size, stride, padding=0, backend: str | None = None) -> Tensor:
    """``F.unfold(x, kernel_size, padding=padding, stride=stride).transpose(1, 2)`` as one contiguous tensor.

    x is (B, C, H, W) with any strides: a contiguous or channels_last image, or tokens (B, N, C) seen as an image
    through the free view ``t.transpose(1, 2).view(B, C, h, w)``. Returns (B, L, C*kh*kw).
    backend: "eager", "cpp", "cuda", "triton", or None/"auto" for the best one available for x.
    """
    k, s, p = to_pair(kernel_size, "kernel_size"), to_pair(stride, "stride"), to_pair(padding, "padding")
    check_soft_split_args(x, k, s, p)
    name = BACKENDS.resolve(backend, x)
    if name == "eager" or needs_eager_autodiff(x):
        return reference.soft_split(x, k, s, p)
    op = torch.ops.t2t_kernels.soft_split_triton if name == "triton" else torch.ops.t2t_kernels.soft_split
    return op(x, k, s, p)


@torch.library.custom_op("t2t_kernels::soft_split_triton", mutates_args=())
def _soft_split_triton(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> Tensor:
    from .triton import soft_split_forward

    return soft_split_forward(x, kernel_size, stride, padding)


@torch.library.custom_op("t2t_kernels::soft_split_triton_backward", mutates_args=())
def _soft_split_triton_backward(
    grad_out: Tensor, input_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], channels_last: bool = False,
) -> Tensor:
    from .triton import soft_split_backward

    return soft_split_backward(grad_out, input_size, kernel_size, stride, padding, channels_last)


def _fake_forward(x, kernel_size, stride, padding):
    B, C, H, W = x.shape
    h, w = reference.output_grid((H, W), kernel_size, stride, padding)
    return x.new_empty((B, h * w, C * kernel_size[0] * kernel_size[1]))


def _fake_backward(grad_out, input_size, kernel_size, stride, padding, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad_out.new_empty(input_size).contiguous(memory_format=fmt)


def grad_is_channels_last(x: Tensor) -> bool:
    """Whether x's gradient should be laid out channels_last: true for channels_last images and for the token view
    (B, N, C) -> (B, C, h, w), so the gradient of the tokens comes out contiguous instead of transposed."""
    return x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _register(suffix: str) -> None:
    forward, backward = f"t2t_kernels::soft_split{suffix}", f"t2t_kernels::soft_split{suffix}_backward"
    if not op_exists(forward):
        return
    forward_op = getattr(torch.ops.t2t_kernels, f"soft_split{suffix}")
    backward_op = getattr(torch.ops.t2t_kernels, f"soft_split{suffix}_backward")
    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)

    def setup_context(ctx, inputs, output):
        x, ctx.kernel_size, ctx.stride, ctx.padding = inputs
        ctx.input_size = list(x.shape)
        ctx.channels_last = grad_is_channels_last(x)

    def grad(ctx, grad_out):
        grad_x = backward_op(grad_out.contiguous(), ctx.input_size, ctx.kernel_size, ctx.stride, ctx.padding,
                             ctx.channels_last)
        return grad_x, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)

    # the fold's own derivative is the unfold: double backward (gradgradcheck, Hessian-vector products) works too
    def setup_backward_context(ctx, inputs, output):
        ctx.kernel_size, ctx.stride, ctx.padding = inputs[2:5]

    def grad_of_backward(ctx, grad_grad_x):
        return forward_op(grad_grad_x, ctx.kernel_size, ctx.stride, ctx.padding), None, None, None, None, None

    torch.library.register_autograd(backward, grad_of_backward, setup_context=setup_backward_context)


_register("")
_register("_triton")
