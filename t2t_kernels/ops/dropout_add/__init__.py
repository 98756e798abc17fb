"""dropout_add: residual + dropout(x, p) in one pass, for training on the CPU.

    out = residual + x * mask / (1 - p),   mask[e] = (Philox4x32-10(seed, e // 4)[e % 4] >= floor(p 2^32))

torch's F.dropout draws a Bernoulli tensor from its sequential CPU generator, divides it by 1 - p and multiplies;
with the residual sum after it that is four passes over the tensor and a saved mask. Here the mask is a function of
(seed, element index) alone (a counter-based generator, as torch's CUDA dropout): one pass forward, nothing saved,
and backward regenerates it (the gradient of x is dropout_add of the incoming gradient without a residual).
Results do not depend on the thread count. The seed is the caller's: the layers draw it from torch's generator, so
torch.manual_seed and checkpointing's RNG replay hold. Masks differ from F.dropout's draws (same distribution).

Backends: "eager" (reference.py: the same mask in torch ops, bitwise the kernel's) and "cpp" (the op
t2t_kernels::dropout_add, csrc/cpu/dropout_add.cpp); "auto" picks cpp for CPU tensors (on GPUs torch's own dropout
is one fused kernel already).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._backends import OpBackends
from .._registry import needs_eager_autodiff, op_exists
from . import reference

BACKENDS = OpBackends(
    name="dropout_add",
    dtypes={"cpp": (torch.float32, torch.float64, torch.bfloat16, torch.float16)},
    auto_order={"cpu": ("cpp",)},
)


def check_dropout_add_args(x: Tensor, residual: Tensor | None, p: float, seed: int | Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"dropout_add: x must be a floating-point Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"dropout_add: residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"dropout_add: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"dropout_add: residual must have x's dtype and device ({x.dtype} on {x.device}), got "
                            f"{residual.dtype} on {residual.device}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:  # NaN fails the bounds
        raise ValueError(f"dropout_add: p must be a probability in [0, 1], got {p!r}")
    if isinstance(seed, Tensor):
        if seed.shape != () or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(f"dropout_add: a seed tensor must be a 0-dim int64 CPU tensor (what draw_seed returns), "
                             f"got shape {tuple(seed.shape)}, {seed.dtype} on {seed.device}")
    elif isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"dropout_add: seed must be an int in [-2^63, 2^63) or a 0-dim int64 CPU tensor, "
                         f"got {seed!r}")


def dropout_add(x: Tensor, residual: Tensor | None, p: float, seed: int | Tensor,
                backend: str | None = None) -> Tensor:
    """``residual + x * mask / (1 - p)`` (``x * mask / (1 - p)`` when residual is None): dropout in training mode
    with its mask from (seed, element index), and the residual sum. x and residual: one shape, dtype and device,
    any strides. seed: an int in [-2^63, 2^63) or a 0-dim int64 CPU tensor holding one (draw_seed's; the same mask
    for the same value). Returns a contiguous tensor. p = 0 keeps everything, p = 1 drops everything (x * 0).
    backend: "eager", "cpp", or None/"auto" for the best one available for x."""
    check_dropout_add_args(x, residual, p, seed)
    name = BACKENDS.resolve(backend, x)
    if name == "eager" or not 0.0 < p < 1.0 or needs_eager_autodiff(x, residual):
        return reference.dropout_add(x, residual, float(p), seed).contiguous()
    if not isinstance(seed, Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device="cpu")  # not torch.set_default_device's
    return torch.ops.t2t_kernels.dropout_add(x.contiguous(), None if residual is None else residual.contiguous(),
                                             float(p), seed)


def draw_seed() -> Tensor:
    """A seed, as a 0-dim int64 CPU tensor (whatever torch.set_default_device says), from torch's default CPU
    generator (so torch.manual_seed makes it reproducible). torch.randint, not Tensor.random_ or .item():
    torch.compile traces it, and the compiled graph then draws a fresh seed from inductor's generator at every call."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device="cpu")


def _fake(x, residual, p, seed):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, residual, ctx.p, seed = inputs
    ctx.save_for_backward(seed)
    ctx.has_residual = residual is not None


def _backward(ctx, grad):
    # d out / d x is the same mask and scale: the op again, without a residual (itself differentiable: double backward)
    grad_x = (torch.ops.t2t_kernels.dropout_add(grad.contiguous(), None, ctx.p, ctx.saved_tensors[0])
              if ctx.needs_input_grad[0] else None)
    grad_residual = grad if ctx.has_residual and ctx.needs_input_grad[1] else None
    return grad_x, grad_residual, None, None


if op_exists("t2t_kernels::dropout_add"):
    torch.library.register_fake("t2t_kernels::dropout_add")(_fake)
    torch.library.register_autograd("t2t_kernels::dropout_add", _backward, setup_context=_setup_context)
