"""linear(f(x)) that keeps x, not f(x), for backward: the layers' LayerNorm -> Linear and GELU -> Linear pairs in
training (the soft split + norm -> kqv Linear of the T2T layers too).

In eager autograd the Linear saves its input, f's output, while f saves its own input as well: two activations where
one determines the other through a cheap elementwise op. Here only f's input (and f's small parameters) is saved;
backward recomputes f(x) once (under the forward's autocast state, so the Linear sees the same values), takes the
Linear's gradients from it, and backpropagates to x and f's parameters: through f's own backward formula for the
LayerNorm and GELU (native_layer_norm_backward, gelu_backward: no nested autograd call, whose host time a GPU train
step waits for), through a nested torch.autograd.grad for the T2T's fused split + norm and whenever a double backward
asks for a differentiable backward. Where the split's image needs no gradient (the first T2T layer), the kqv's and
norm1's gradients come from the normalised tokens instead, without forming the tokens' gradient (the step's biggest
product at that layer: _grads_of_affine_input). Same gradients as eager, up to the GEMMs' rounding. The saved
activations of a T2T-ViT block drop from 14 to 9 widths per token (fp32); T2T-ViT-14's in all from 78.9 to 46.7 MB per 224x224 image
(44.6 MB with the model's class-token-only last block).

With the extension, the LayerNorm and GELU pairs run as its C++ autograd ops t2t_kernels::norm_linear and
gelu_linear (csrc/recompute.cpp: the same ops as the Function's vjp path, bitwise the same results, without the
Python Function's host time: about 70 us per pair on a 2-core CPU, where a GPU train step waits on the host); the
Function below serves the soft split + norm pairs, and every pair without the extension. Both run the Linear's
product and its input's gradient through oneDNN in float32 on the CPU where it is on (ops/_onednn.py: by default
every CPU but Intel's; the weight's gradient stays ATen's), outside autocast and double backward.

Under torch.compile each pair is a selective activation checkpoint instead (keep the Linear's product, recompute f):
dynamo does not trace the Function's backward (its torch.autograd.grad; trace_autograd_ops is off by default), and
the compiler's own partitioner, left alone, kept 0.90x eager's activations for T2T-ViT-14's train step (CPU bench;
0.57x with the checkpoints). In eager mode the Function is the better of the two: selective checkpointing kept 11%
more (427 vs 385 MB at B=8) and ran 2-4% slower. Where the first T2T layer's image needs no gradient, the compiled
pair folds norm1's affine step into the kqv's weight and bias (_linear_of_folded_affine): autograd then skips the
tokens' gradient as _grads_of_affine_input does (fp32 T2T module train step at B=8, one CPU thread: 217 vs 241 ms).
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .._env import env_flag
from .._extension import has_kernel
from ..ops import _onednn as onednn
from ..ops._registry import autocast_enabled, autocast_off, grad_enabled_for_path, needs_eager_autodiff

# the C++ autograd ops of the LayerNorm/GELU -> Linear pairs (csrc/recompute.cpp), when the extension has them
_HAS_CPP_PAIRS = has_kernel("t2t_kernels::norm_linear", "Autograd") and \
    has_kernel("t2t_kernels::gelu_linear", "Autograd")


class _LinearOfRecomputed(torch.autograd.Function):
    # forward takes ctx (no separate setup_context, which torch.func would need): that form's apply cost ~50 us more
    # host time per pair (a block's fwd+bwd at tiny size: 1006 vs 797 us); under torch.func the plain modules run
    @staticmethod
    def forward(ctx, f, weight, bias, x, *f_params):
        out = onednn.linear(f(x, *f_params), weight, bias)
        device = x.device.type
        ctx.f = f
        enabled = autocast_enabled(device)
        ctx.autocast = (device, torch.get_autocast_dtype(device) if enabled else None, enabled)
        ctx.save_for_backward(weight, x, *f_params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, x, *f_params = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()  # a double backward: every step below is differentiable then
        needs_weight, needs_bias = ctx.needs_input_grad[1:3]
        needs_inputs = ctx.needs_input_grad[3:]
        inputs = [x, *f_params]
        device, dtype, enabled = ctx.autocast
        vjp = getattr(ctx.f, "vjp", None)
        if vjp is not None and not create_graph and device in _AUTOCAST_LAYER_NORM_FP32:
            # f's own backward formula: no nested autograd call (its graph and engine pass took ~0.4 ms of host time
            # per pair, profiled: 18 ms of a T2T-ViT-14 train step at B=128 on an H100, whose GPU waited for the host)
            # the vjp casts as the forward's autocast did; autocast left on in this thread (a CPU backward called
            # inside the autocast region) would cast again. CUDA's backward threads run without it: no context there
            with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
                a, f_backward = vjp(enabled, *inputs)
                grad_weight, grad_bias, grad_a = _linear_grads(grad_out, a, weight, needs_weight, needs_bias,
                                                               any(needs_inputs))
                grad_inputs = f_backward(grad_a, needs_inputs) if grad_a is not None else [None] * len(inputs)
            return (None, grad_weight, grad_bias, *grad_inputs)
        normalized = _affine_of_constant(ctx.f, needs_inputs[0] or create_graph, enabled, f_params)
        if normalized is not None:
            return (None, *_grads_of_affine_input(normalized(x), grad_out, weight, *f_params,
                                                  (needs_weight, needs_bias, *needs_inputs[1:])))
        wanted = [i for i, need in enumerate(needs_inputs) if need]
        with torch.enable_grad(), torch.autocast(device, dtype=dtype) if enabled else autocast_off(device):
            # from the saved inputs themselves (not detached copies), so that a double backward reaches them
            a = ctx.f(*inputs)
        grad_weight, grad_bias, grad_a = _linear_grads(grad_out, a if create_graph else a.detach(), weight,
                                                       needs_weight, needs_bias, bool(wanted))
        grad_inputs = [None] * len(inputs)
        if wanted:
            grads = torch.autograd.grad(a, [inputs[i] for i in wanted], grad_a, create_graph=create_graph)
            for i, g in zip(wanted, grads):
                grad_inputs[i] = g
        return (None, grad_weight, grad_bias, *grad_inputs)


def _linear_grads(grad_out, a, weight, needs_weight, needs_bias, needs_a):
    """The Linear's weight and bias gradients and the gradient of its input a (in a's dtype): 2-D mm on flat views,
    and casts only where dtypes differ (each call from Python costs host time, which a GPU step waits for)."""
    dtype = grad_out.dtype
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_weight = grad_bias = grad_a = None
    if needs_weight:
        # what the Linear consumed: autocast casts its input (and weight) to the output's dtype
        consumed = a if a.dtype == dtype else a.to(dtype)
        grad_weight = _cast(torch.mm(g2.t(), consumed.reshape(-1, consumed.shape[-1])), weight.dtype)
    if needs_bias:  # False for a missing bias
        grad_bias = _cast(g2.sum(0), weight.dtype)
    if needs_a:
        # g W = linear(g, W^T): oneDNN where it applies (float32 CPU outside double backward), as the C++ pairs
        grad_a = _cast(onednn.linear(g2, _cast(weight, dtype).t()), a.dtype)
        grad_a = grad_a.view(*grad_out.shape[:-1], weight.shape[1])
    return grad_weight, grad_bias, grad_a


def _grads_of_affine_input(xhat, grad_out, weight, norm_weight, norm_bias, needs):
    """The gradients of linear(xhat * norm_weight + norm_bias, weight, bias) for (None, weight, bias, norm_weight,
    norm_bias), as needs asks, when xhat's source needs none: with g the output's gradient, s its sum over rows and
    M = g^T xhat, dweight = M * norm_weight + s norm_bias^T, dbias = s, dnorm_weight = sum_o weight * M and
    dnorm_bias = s weight. The gradient of the Linear's input, g weight (the size of the tokens: at the T2T module's
    first layer the train step's biggest product), is never formed; M replaces the weight gradient's product."""
    needs_weight, needs_bias, needs_norm_weight, needs_norm_bias = needs
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    s = g2.sum(0)
    m = torch.mm(g2.t(), xhat.reshape(-1, xhat.shape[-1])) if needs_weight or needs_norm_weight else None
    return (torch.addr(m * norm_weight, s, norm_bias) if needs_weight else None, s if needs_bias else None,
            None, (weight * m).sum(0) if needs_norm_weight else None, s @ weight if needs_norm_bias else None)


def _affine_of_constant(f, x_needs_grad: bool, autocast_on: bool, f_params):
    """f's `normalized` (x -> the tokens before f's affine step) where f is an affine norm whose input needs no
    gradient (the image into the first T2T layer), outside autocast (whose casts the Linear's gradients follow
    otherwise); None where not."""
    normalized = getattr(f, "normalized", None)
    if normalized is None or x_needs_grad or autocast_on or any(p is None for p in f_params):
        return None
    return normalized


def _linear_of_folded_affine(normalized, linear, x, norm_weight, norm_bias):
    """linear(normalized(x) * norm_weight + norm_bias) with the affine step folded into the Linear's weight and bias
    (the compiled form of _grads_of_affine_input): autograd then takes the weights' gradients from the normalised
    tokens' product with the output's gradient and never forms the tokens' own gradient, which x does not need."""
    weight, bias = linear.weight, linear.bias
    folded_bias = torch.mv(weight, norm_bias) if bias is None else torch.addmv(bias, weight, norm_bias)
    return F.linear(normalized(x), weight * norm_weight, folded_bias)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _keep_products(ctx, op, *args, **kwargs):  # the selective checkpoint's policy (under torch.compile)
    return CheckpointPolicy.MUST_SAVE if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) \
        else CheckpointPolicy.PREFER_RECOMPUTE


def _linear_of(f, linear, x, *f_params):
    return linear(f(x, *f_params))


def linear_of_recomputed(f: Callable[..., Tensor], linear: nn.Linear, x: Tensor, *f_params) -> Tensor:
    """linear(f(x, *f_params)), saving x and f_params instead of f's output (see the module docstring)."""
    if torch.compiler.is_compiling():
        normalized = _affine_of_constant(f, x.requires_grad, autocast_enabled(x.device.type), f_params)
        fn, f = (_linear_of, f) if normalized is None else (_linear_of_folded_affine, normalized)
        return checkpoint(fn, f, linear, x, *f_params, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_products))
    if needs_eager_autodiff(x, linear.weight, linear.bias, *f_params):
        # torch.func transforms and forward-mode AD: the Function has no vmap or jvp rule, and torch.func.vjp calls
        # its backward outside the transform (found by review: vjp, jacrev, vmap, jvp raised in training)
        return _linear_of(f, linear, x, *f_params)
    return _LinearOfRecomputed.apply(f, linear.weight, linear.bias, x, *f_params)


# whether autocast runs layer_norm in float32 on this device type (CUDA's fp32 list; CPU's autocast leaves it alone):
# the vjps below cast as autocast did. Other devices take the nested-autograd backward.
_AUTOCAST_LAYER_NORM_FP32 = {"cpu": False, "cuda": True}


class _LayerNormFn:
    """(x, weight, bias) -> F.layer_norm with norm's shape and eps, and its vjp. A class, not a closure given a vjp
    attribute: dynamo in torch 2.6 cannot trace setting an attribute on a function."""

    def __init__(self, norm: nn.LayerNorm):
        self.shape, self.eps = norm.normalized_shape, norm.eps

    def __call__(self, x, weight, bias):
        return F.layer_norm(x, self.shape, weight, bias, self.eps)

    def vjp(self, autocast_enabled, x, weight, bias):
        """f's output and backward as autograd runs them for F.layer_norm (autocast's cast to fp32 included)."""
        shape = self.shape
        inputs = (x, weight, bias)
        if autocast_enabled and _AUTOCAST_LAYER_NORM_FP32[x.device.type]:
            inputs = tuple(t.float() if t is not None and t.dtype != torch.float64 else t for t in inputs)  # as autocast
        xc, wc, bc = inputs
        a, mean, rstd = torch.native_layer_norm(xc, shape, wc, bc, self.eps)

        def backward(grad_a, needs):
            mask = [bool(need) and t is not None for need, t in zip(needs, inputs)]
            grads = torch.ops.aten.native_layer_norm_backward(grad_a, xc, shape, mean, rstd, wc, bc, mask)
            return [_cast(g, t.dtype) if need else None for g, t, need in zip(grads, (x, weight, bias), mask)]
        return a, backward


def _gelu(h: Tensor) -> Tensor:
    return F.gelu(h)


def _gelu_vjp(autocast_enabled, h):
    # autocast leaves GELU in its input's dtype on every device
    return F.gelu(h), lambda grad_a, needs: [torch.ops.aten.gelu_backward(grad_a, h) if needs[0] else None]


_gelu.vjp = _gelu_vjp


_checkpointed = threading.local()  # .active: this thread runs a layer inside gradient checkpointing


def run_checkpointed(layer, x: Tensor) -> Tensor:
    """layer(x) as torch.utils.checkpoint runs it (forward and recomputation): the whole layer is recomputed in
    backward anyway, so it keeps no lean pairs of its own (they would recompute their elementwise ops a second time)."""
    if torch.compiler.is_compiling():
        return layer(x)
    before = getattr(_checkpointed, "active", False)
    _checkpointed.active = True
    try:
        return layer(x)
    finally:
        _checkpointed.active = before


RECOMPUTE_ENV = "T2T_RECOMPUTE_PAIRS"


def recompute_pairs_enabled() -> bool:
    """T2T_RECOMPUTE_PAIRS=0 turns the lean pairs off: eager's saved activations (more memory), for A/B timing."""
    return env_flag(RECOMPUTE_ENV, True)


# dynamo should not trace the environment lookup; read when a graph is traced (a change needs a new compile)
_recompute_pairs_enabled = torch.compiler.assume_constant_result(recompute_pairs_enabled)


def is_last_dim_layer_norm(module: nn.Module) -> bool:
    """Exactly nn.LayerNorm over the last dim: what the fused ops and the lean pairs compute as a layer's norm."""
    return type(module) is nn.LayerNorm and len(module.normalized_shape) == 1


def recomputes(backend: str | None, *norm_linear_pairs: tuple[nn.Module, nn.Module]) -> bool:
    """Whether a layer trains through linear_of_recomputed: a fused backend (not "eager"), each (norm, Linear) pair
    an nn.LayerNorm over the last dim and an nn.Linear, gradients wanted, no gradient checkpointing recomputing
    the whole layer (not tracked under torch.compile, where the pairs' checkpoints nest in the layer's), and
    T2T_RECOMPUTE_PAIRS not 0."""
    return (backend != "eager" and grad_enabled_for_path() and _recompute_pairs_enabled()
            and all(is_last_dim_layer_norm(norm) and type(linear) is nn.Linear
                    for norm, linear in norm_linear_pairs)
            and (torch.compiler.is_compiling() or not getattr(_checkpointed, "active", False)))


def _cpp_pairs(*tensors) -> bool:
    """Whether the C++ autograd ops take the pair (csrc/recompute.cpp): the extension has them, and neither
    torch.compile (selective checkpoints instead) nor forward-mode AD or a torch.func transform (the plain modules)
    asks for something else."""
    return _HAS_CPP_PAIRS and not torch.compiler.is_compiling() and not needs_eager_autodiff(*tensors)


def norm_linear(norm: nn.LayerNorm, linear: nn.Linear, x: Tensor) -> Tensor:
    """linear(norm(x)) keeping x for backward, not norm(x)."""
    norm_weight, norm_bias, weight, bias = norm.weight, norm.bias, linear.weight, linear.bias  # each read costs
    if _cpp_pairs(x, norm_weight, norm_bias, weight, bias):
        return torch.ops.t2t_kernels.norm_linear.default(x, norm_weight, norm_bias, norm.normalized_shape, norm.eps,
                                                         weight, bias)
    return linear_of_recomputed(_LayerNormFn(norm), linear, x, norm_weight, norm_bias)


def gelu_linear(linear: nn.Linear, h: Tensor) -> Tensor:
    """linear(gelu(h)) (exact GELU) keeping h for backward, not gelu(h)."""
    weight, bias = linear.weight, linear.bias
    if _cpp_pairs(h, weight, bias):
        return torch.ops.t2t_kernels.gelu_linear.default(h, weight, bias)
    return linear_of_recomputed(_gelu, linear, h)
