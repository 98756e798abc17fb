"""performer_attention: fused random-feature (FAVOR+) linear attention, non-causal (DESIGN §4).

Backends: "eager" (reference.py), "cpp" (the compiled op t2t_kernels::performer_attention, csrc/cpu), "triton"
(the op t2t_kernels::performer_attention_triton, triton.py). The ops return y and the small fp32 state
(kv_state (B, m, E), k_sum (B, m)) that backward needs; phi(q), phi(k) are never stored.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._backends import OpBackends, is_explicit
from .._registry import check_eps, needs_eager_autodiff, op_exists, recompute_grads
from . import reference

BACKENDS = OpBackends(
    name="performer_attention",
    dtypes={
        "cpp": (torch.float32, torch.float64, torch.bfloat16),
        "cuda": (torch.float32, torch.float16, torch.bfloat16),
        "triton": (torch.float32, torch.float16, torch.bfloat16),
    },
    auto_order={"cuda": ("triton", "cuda"), "cpu": ("cpp",)},
)


def check_performer_args(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("w", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"performer_attention: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"performer_attention: {name} must be floating point, got dtype {t.dtype}")
    if q.dim() < 2:
        raise ValueError(f"performer_attention: q must be (..., T, E), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "performer_attention: q, k and v must have the same shape (..., T, E), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"performer_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if w.dim() != 2 or w.shape[1] != q.shape[-1] or w.shape[0] < 1:
        raise ValueError(
            f"performer_attention: w must be (m, E) with E = {q.shape[-1]} (the width of q), got shape {tuple(w.shape)}"
        )
    devices = {t.device for t in (q, k, v, w)}
    if len(devices) > 1:
        raise ValueError(f"performer_attention: q, k, v, w must be on one device, got {sorted(map(str, devices))}")
    check_eps(eps, "performer_attention", positive=True)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float = 1e-8,
                        backend: str | None = None) -> Tensor:
    """y = phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k) + eps) with phi(x) = exp(x w^T - |x|^2/2) / sqrt(m).

    q, k, v: (..., T, E), any leading dims and strides; w: (m, E), fixed. The exponent and all sums run in fp32
    whatever the input dtype, so fp16/bf16 cannot overflow. Returns y (..., T, E) in the dtype of q.
    backend: "eager", "cpp", "cuda", "triton", or None/"auto" for the best one available for q.
    """
    check_performer_args(q, k, v, w, eps)
    name = BACKENDS.resolve(backend, q)
    if name == "eager" or q.numel() == 0 or needs_eager_autodiff(q, k, v, w):
        # empty inputs (a 0 in the leading dims, T or E) have nothing to compute, and (-1, T, E) is ambiguous for them;
        # the eager formula also differentiates w (e.g. torch.func.grad over all of a model's parameters)
        return reference.performer_attention(q, k, v, w, float(eps))
    if w.requires_grad and torch.is_grad_enabled():
        # the kernels have no gradient for w: "auto" takes the eager formula (as the official model trains a w made
        # trainable, e.g. by model.requires_grad_(True)); an explicit kernel backend refuses
        if is_explicit(backend):
            raise RuntimeError(
                f"performer_attention: w is the fixed random-feature matrix and backend {name!r} has no gradient for "
                "it; set w.requires_grad_(False) (Token_performer keeps it frozen), or use backend='eager' or 'auto'"
            )
        if not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn
            warnings.warn("performer_attention: w requires a gradient, which the kernels do not compute: the eager "
                          "formula runs instead (slower); w.requires_grad_(False) keeps the random features fixed, "
                          "as Token_performer builds them", stacklevel=2)
        return reference.performer_attention(q, k, v, w, float(eps))
    op = (torch.ops.t2t_kernels.performer_attention_triton if name == "triton"
          else torch.ops.t2t_kernels.performer_attention)
    T, E = q.shape[-2:]
    # the kernels take (B, T, E) with a unit last stride; flattening leading dims is a view for the usual inputs
    q3, k3, v3 = (t.reshape(-1, T, E) if t.stride(-1) == 1 else t.contiguous().view(-1, T, E) for t in (q, k, v))
    y = op(q3, k3, v3, w, float(eps))[0]
    return y.view(q.shape)


@torch.library.custom_op("t2t_kernels::performer_attention_triton", mutates_args=())
def _performer_attention_triton(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    from .triton import performer_attention_forward

    return performer_attention_forward(q, k, v, w, eps)


@torch.library.custom_op("t2t_kernels::performer_attention_triton_backward", mutates_args=())
def _performer_attention_triton_backward(
    grad_y: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, kv_state: Tensor, k_sum: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    from .triton import performer_attention_backward

    return performer_attention_backward(grad_y, q, k, v, w, kv_state, k_sum, eps)


def _fake_forward(q, k, v, w, eps):
    acc = reference.accumulation_dtype(q.dtype)
    B, T, E = q.shape
    m = w.shape[0]
    return q.new_empty((B, T, E)), q.new_empty((B, m, E), dtype=acc), q.new_empty((B, m), dtype=acc)


def _fake_backward(grad_y, q, k, v, w, kv_state, k_sum, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _register(suffix: str) -> None:
    forward = f"t2t_kernels::performer_attention{suffix}"
    if not op_exists(forward):
        return
    backward_op = (torch.ops.t2t_kernels.performer_attention_triton_backward if suffix
                   else torch.ops.t2t_kernels.performer_attention_backward)
    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(f"{forward}_backward")(_fake_backward)

    def setup_context(ctx, inputs, output):
        q, k, v, w, ctx.eps = inputs
        _, kv_state, k_sum = output
        ctx.mark_non_differentiable(kv_state, k_sum)
        ctx.save_for_backward(q, k, v, w, kv_state, k_sum)

    def grad(ctx, grad_y, _grad_kv_state, _grad_k_sum):
        q, k, v, w, kv_state, k_sum = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the fused backward op has no derivative of its own, so the gradient
            # comes from the reference under autograd, whose graph reaches q, k and v
            gq, gk, gv = recompute_grads(lambda q, k, v: reference.performer_attention(q, k, v, w, ctx.eps),
                                         (q, k, v), (), grad_y, ctx.needs_input_grad[:3])
        else:
            gq, gk, gv = backward_op(grad_y.contiguous(), q, k, v, w, kv_state, k_sum, ctx.eps)
        return gq, gk, gv, None, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


_register("")
_register("_triton")
