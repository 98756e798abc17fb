"""softmax_attention: the backbone's multi-head attention after its qkv projection, as one op (forward) on CPU.

    q, k, v = qkv (B, N, 3*heads*head_dim) split into (B, heads, N, head_dim) each (nn.Linear's packing, as the
    official Attention reshapes it);  out = softmax(q k^T * scale) v, heads merged back: (B, N, heads*head_dim)

The cpp kernel (csrc/cpu/softmax_attention.cpp) takes one head of one image at a time: its keys (transposed,
scaled) and values packed in cache, then blocks of queries through scores, the row softmax and the value product,
written straight into the merged heads. q, k, v are read in place from qkv; nothing of size (N, N) reaches memory.
At the backbone's 197 tokens (T2T-ViT-14, B=8 on a 2-core CPU) it took 2.38 ms against SDPA's 2.96 (op bench,
2026-11-28).
Backends: "eager" (reference.py: F.scaled_dot_product_attention, what the layers run) and "cpp" (fp32 and fp64,
and bf16 computed in fp32: CPU autocast's qkv); "auto" picks cpp for CPU tensors it supports and eager otherwise.

Backward: for float32/float64 with at most BACKWARD_MAX_TOKENS tokens, a second cpp kernel
(t2t_kernels::softmax_attention_backward) recomputes each head's probabilities from the saved qkv (nothing else is
kept) and writes the three gradients straight into one packed grad_qkv; otherwise (bf16, longer sequences) the
eager formula is recomputed and differentiated. At the backbone's 197 tokens (B=8, 2-core EPYC)
forward + backward took 11 ms against SDPA's 16.6-18 (with the stack and copy of its q, k, v gradients), so the
blocks train through the op on CPU too (Attention.attend_projected). A double backward through the kernels
differentiates the written-out formula (q k^T, softmax, v), which has the second derivative SDPA's CPU kernel lacks
(the eager backend is SDPA: none there); the layers' official formula (Attention.fused_attn = False) never takes
the op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._backends import OpBackends
from .._registry import finite_number, needs_eager_autodiff, op_exists, recompute_grads
from . import reference

# the backward kernel keeps a head's probabilities and their gradient, 2 N^2 values, in each thread's scratch
BACKWARD_MAX_TOKENS = 512
# the extension's registrations do not change after import: asked once, not per layer call
_HAS_BACKWARD_KERNEL = op_exists("t2t_kernels::softmax_attention_backward")

BACKENDS = OpBackends(
    name="softmax_attention",
    dtypes={"cpp": (torch.float32, torch.float64, torch.bfloat16)},
    auto_order={"cpu": ("cpp",)},
    follows_autocast=True,
)


def check_softmax_attention_args(qkv: Tensor, num_heads: int, scale: float) -> None:
    if not isinstance(qkv, Tensor) or not qkv.is_floating_point():
        raise TypeError(f"softmax_attention: qkv must be a floating-point Tensor, got "
                        f"{getattr(qkv, 'dtype', type(qkv).__name__)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"softmax_attention: num_heads must be a positive int, got {num_heads!r}")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"softmax_attention: qkv must be (B, N, 3*num_heads*head_dim), got {tuple(qkv.shape)} "
                         f"with num_heads={num_heads}")
    if not finite_number(scale):
        raise ValueError(f"softmax_attention: scale must be a finite number, got {scale!r}")


def softmax_attention(qkv: Tensor, num_heads: int, scale: float | None = None, backend: str | None = None) -> Tensor:
    """Multi-head softmax attention of a packed ``qkv`` (B, N, 3*num_heads*head_dim), any strides: returns
    ``softmax(q k^T * scale) v`` per head with the heads merged, (B, N, num_heads*head_dim), contiguous, in qkv's
    dtype. scale: None for head_dim ** -0.5. backend: "eager", "cpp", or None/"auto" for the best one available."""
    check_softmax_attention_args(qkv, num_heads, 0.0 if scale is None else scale)
    if scale is None:
        scale = (qkv.shape[-1] // (3 * num_heads)) ** -0.5 if qkv.shape[-1] else 1.0
    name = BACKENDS.resolve(backend, qkv)
    if needs_eager_autodiff(qkv):  # forward-mode AD or a torch.func transform: SDPA's CPU kernel has no jvp
        return reference.softmax_attention_formula(qkv, num_heads, float(scale)).contiguous()
    if name == "eager" or qkv.numel() == 0:
        return reference.softmax_attention(qkv, num_heads, float(scale)).contiguous()
    return torch.ops.t2t_kernels.softmax_attention(qkv if qkv.stride(-1) == 1 else qkv.contiguous(), num_heads,
                                                   float(scale))


def _fake_forward(qkv, num_heads, scale):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


def _fake_backward(grad_out, qkv, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def backward_kernel_applies(qkv: Tensor) -> bool:
    """Whether the op's backward runs the cpp kernel for this qkv (else it recomputes the eager formula)."""
    return (qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.float64)
            and qkv.shape[1] <= BACKWARD_MAX_TOKENS and _HAS_BACKWARD_KERNEL)


def _setup_context(ctx, inputs, output):
    qkv, ctx.num_heads, ctx.scale = inputs
    ctx.save_for_backward(qkv)


def _backward(ctx, grad_out):
    qkv, = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: the written-out formula, which (unlike SDPA) has a second derivative
        grad, = recompute_grads(reference.softmax_attention_formula, (qkv,), (ctx.num_heads, ctx.scale), grad_out,
                                (True,))
    elif not backward_kernel_applies(qkv):  # inputs the kernel does not take: SDPA's backward
        grad, = recompute_grads(reference.softmax_attention, (qkv,), (ctx.num_heads, ctx.scale), grad_out, (True,))
    else:
        grad = torch.ops.t2t_kernels.softmax_attention_backward(grad_out, qkv, ctx.num_heads, ctx.scale)
    return grad, None, None


if op_exists("t2t_kernels::softmax_attention"):
    torch.library.register_fake("t2t_kernels::softmax_attention")(_fake_forward)
    torch.library.register_fake("t2t_kernels::softmax_attention_backward")(_fake_backward)
    torch.library.register_autograd("t2t_kernels::softmax_attention", _backward, setup_context=_setup_context)
