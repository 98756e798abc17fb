"""post_attention: everything of a transformer layer after its attention, as one op (forward) on CPU.

    x = skip + y proj_weight^T + proj_bias                         (the output projection and its skip)
    out = x + gelu(layer_norm(x) fc1_weight^T + fc1_bias) fc2_weight^T + fc2_bias    (norm2 and the residual MLP)

In the T2T module's token layers (64 wide, 25K rows at 224x224, B=8) these are a chain of thin layers whose
intermediates do not fit in cache: eager writes and reads eight (B, T, 64) tensors between them. The cpp kernel
(csrc/cpu/post_attention.cpp) runs the chain on blocks of rows in cache: it reads y and skip once and writes the
output once. The backbone's layers (E=384, H=1152 in T2T-ViT-14) have weights of megabytes, which no block of rows keeps
in cache: above WIDE_WEIGHT_BYTES of weights the kernel runs the three products as whole-matrix GEMMs, in float32
oneDNN's linear with the bias, skip, GELU and residual in its epilogues (ops/_onednn.py says when), else ATen's (MKL)
with the bias, skip, norm, GELU and residual work between them fused into three passes over the rows (eager: seven).
Backends: "eager" (reference.py) and "cpp" (t2t_kernels::post_attention, fp32 and fp64); "auto" picks cpp
for CPU tensors it supports and eager otherwise (CUDA: torch's GEMMs are the fast path there).

Backward recomputes the chain in eager from the saved inputs and differentiates it (no fused backward yet): the layers
use the op only where no gradient is wanted (inference), so a training step never pays for the recomputation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._backends import OpBackends
from .._registry import check_eps, needs_eager_autodiff, op_exists, register_recompute_autograd
from . import reference

# weights (D E + 2 E H elements) above this many bytes take the cpp kernel's wide path (kWideWeightBytes there)
WIDE_WEIGHT_BYTES = 1 << 20

BACKENDS = OpBackends(
    name="post_attention",
    dtypes={"cpp": (torch.float32, torch.float64)},
    auto_order={"cpu": ("cpp",)},
    follows_autocast=True,
)

# (name, shape as a function of (D, E, H)), in argument order after y and skip; biases and norm parameters may be None
_PARAMS = (
    ("proj_weight", lambda D, E, H: (E, D)),
    ("proj_bias", lambda D, E, H: (E,)),
    ("norm_weight", lambda D, E, H: (E,)),
    ("norm_bias", lambda D, E, H: (E,)),
    ("fc1_weight", lambda D, E, H: (H, E)),
    ("fc1_bias", lambda D, E, H: (H,)),
    ("fc2_weight", lambda D, E, H: (E, H)),
    ("fc2_bias", lambda D, E, H: (E,)),
)
_OPTIONAL = {"proj_bias", "norm_weight", "norm_bias", "fc1_bias", "fc2_bias"}


def check_post_attention_args(y: Tensor, skip: Tensor, params: tuple, eps: float) -> None:
    for name, t in (("y", y), ("skip", skip)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"post_attention: {name} must be a floating-point Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if y.dim() < 1 or skip.dim() != y.dim() or skip.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"post_attention: y (..., D) and skip (..., E) must share their leading dims, got y "
                         f"{tuple(y.shape)} and skip {tuple(skip.shape)}")
    weight = params[0]
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"post_attention: proj_weight must be a 2-D Tensor (E, D), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    fc1 = params[4]
    if not isinstance(fc1, Tensor) or fc1.dim() != 2:
        raise ValueError(f"post_attention: fc1_weight must be a 2-D Tensor (H, E), got "
                         f"{tuple(fc1.shape) if isinstance(fc1, Tensor) else type(fc1).__name__}")
    D, E, H = y.shape[-1], skip.shape[-1], fc1.shape[0]
    for (name, shape_of), t in zip(_PARAMS, params):
        if t is None and name in _OPTIONAL:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"post_attention: {name} must be a Tensor{' or None' * (name in _OPTIONAL)}, got "
                            f"{type(t).__name__}")
        if tuple(t.shape) != shape_of(D, E, H):
            raise ValueError(f"post_attention: {name} must have shape {shape_of(D, E, H)} for y {tuple(y.shape)}, "
                             f"skip {tuple(skip.shape)} and fc1_weight {tuple(fc1.shape)} (D={D}, E={E}, H={H}), "
                             f"got {tuple(t.shape)}")
    tensors = [("y", y), ("skip", skip)] + [(n, t) for (n, _), t in zip(_PARAMS, params) if t is not None]
    dtypes = {t.dtype for _, t in tensors}
    if len(dtypes) > 1:
        raise TypeError("post_attention: all tensors must share one dtype, got "
                        + ", ".join(f"{n} {t.dtype}" for n, t in tensors))
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        raise ValueError("post_attention: all tensors must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in tensors))
    check_eps(eps, "post_attention")


def post_attention(y: Tensor, skip: Tensor, proj_weight: Tensor, proj_bias: Tensor | None,
                   norm_weight: Tensor | None, norm_bias: Tensor | None, fc1_weight: Tensor, fc1_bias: Tensor | None,
                   fc2_weight: Tensor, fc2_bias: Tensor | None, eps: float = 1e-5,
                   backend: str | None = None) -> Tensor:
    """``x = skip + linear(y, proj_weight, proj_bias)``, then
    ``x + linear(gelu(linear(layer_norm(x, (E,), norm_weight, norm_bias, eps), fc1_weight, fc1_bias)), fc2_weight,
    fc2_bias)``, with the exact (erf) GELU.

    y (..., D) and skip (..., E) with the same leading dims and any strides; weights as nn.Linear keeps them:
    proj (E, D), fc1 (H, E), fc2 (E, H); biases and the norm's weight and bias may be None. Returns (..., E),
    contiguous, in the dtype shared by all inputs.
    backend: "eager", "cpp", or None/"auto" for the best one available for y.
    """
    params = (proj_weight, proj_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    check_post_attention_args(y, skip, params, eps)
    name = BACKENDS.resolve(backend, y)
    if name == "eager" or y.numel() == 0 or skip.numel() == 0 or needs_eager_autodiff(y, skip, *params):
        # contiguous like the kernel's output (the reference's would follow skip's layout)
        return reference.post_attention(y, skip, *params, float(eps)).contiguous()
    # the kernel takes every parameter: a missing bias is zeros, a missing norm weight ones
    E, H = skip.shape[-1], fc1_weight.shape[0]
    filled = [t if t is not None else (y.new_ones(E) if pname == "norm_weight" else y.new_zeros(shape_of(0, E, H)))
              for (pname, shape_of), t in zip(_PARAMS, params)]
    # the kernel takes (rows, width) with a unit last stride; flattening the leading dims is a view for the layers'
    # inputs (skip is a column slice of the kqv output)
    y2, skip2 = (t.reshape(-1, t.shape[-1]) if t.stride(-1) == 1 else t.contiguous().view(-1, t.shape[-1])
                 for t in (y, skip))
    out = torch.ops.t2t_kernels.post_attention(y2, skip2, *filled, float(eps))
    return out.view(skip.shape)


def _fake_forward(y, skip, proj_weight, proj_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                  fc2_bias, eps):
    return skip.new_empty(skip.shape)


if op_exists("t2t_kernels::post_attention"):
    torch.library.register_fake("t2t_kernels::post_attention")(_fake_forward)
    register_recompute_autograd("t2t_kernels::post_attention", reference.post_attention, num_tensors=10)
