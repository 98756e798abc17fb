"""torch.func and forward-mode AD through every op. The compiled kernels have no forward derivative (torch.library
autograd is reverse mode only, and without a grad-requiring input the tangent used to be dropped silently: zero
jvps), and torch.library's generated autograd Function lacks the setup_context that torch.func.grad/vjp/jacrev
require (they raised), so the ops take their eager formulas when an input carries a tangent or a torch.func
transform wraps it. torch.func.jvp, forward_ad dual tensors, the forward-mode Jacobian, torch.func.vjp, grad,
jacrev and vmap match the eager backend, with respect to the data and to the parameters."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from t2t_kernels.ops import (PERFORMER_BACKENDS, POST_ATTENTION_BACKENDS, SOFT_SPLIT_BACKENDS,
                             SOFT_SPLIT_LAYER_NORM_BACKENDS, SOFTMAX_ATTENTION_BACKENDS, performer_attention,
                             post_attention, soft_split, soft_split_layer_norm, softmax_attention)


def _soft_split_case(dtype):
    return (lambda x, backend: soft_split(x, 3, 2, 1, backend=backend)), [torch.randn(2, 3, 5, 6, dtype=dtype)]


def _soft_split_layer_norm_case(dtype):
    def fn(x, weight, bias, backend):
        return soft_split_layer_norm(x, 3, 2, 1, weight, bias, 1e-5, backend=backend)
    return fn, [torch.randn(2, 3, 5, 6, dtype=dtype), 1 + 0.1 * torch.randn(27, dtype=dtype),
                0.1 * torch.randn(27, dtype=dtype)]


def _performer_case(dtype):
    w = torch.nn.init.orthogonal_(torch.empty(4, 8, dtype=dtype)) * 2.0  # fixed random features: no tangent

    def fn(q, k, v, backend):
        return performer_attention(q, k, v, w, eps=1e-8, backend=backend)
    return fn, [0.5 * torch.randn(2, 9, 8, dtype=dtype) for _ in range(3)]


def _post_attention_case(dtype):
    D, E, H = 6, 5, 7

    def fn(y, skip, proj_w, fc1_w, fc2_w, backend):
        ones = torch.ones(E, dtype=dtype)
        return post_attention(y, skip, proj_w, None, ones, None, fc1_w, None, fc2_w, None, 1e-5, backend=backend)
    shapes = [(2, 4, D), (2, 4, E), (E, D), (H, E), (E, H)]
    return fn, [torch.randn(*s, dtype=dtype) / math.sqrt(s[-1]) for s in shapes]


def _softmax_attention_case(dtype):
    def fn(qkv, backend):
        return softmax_attention(qkv, 2, backend=backend)
    return fn, [torch.randn(2, 5, 3 * 2 * 4, dtype=dtype)]


CASES = {  # op -> (its backends, a case builder: (fn(*inputs, backend), inputs))
    "soft_split": (SOFT_SPLIT_BACKENDS, _soft_split_case),
    "soft_split_layer_norm": (SOFT_SPLIT_LAYER_NORM_BACKENDS, _soft_split_layer_norm_case),
    "performer_attention": (PERFORMER_BACKENDS, _performer_case),
    "post_attention": (POST_ATTENTION_BACKENDS, _post_attention_case),
    "softmax_attention": (SOFTMAX_ATTENTION_BACKENDS, _softmax_attention_case),
}
PARAMS = [(op, backend) for op in CASES for backend in ("cpp", "triton")]


def _case(op, backend):
    backends, build = CASES[op]
    dtype = torch.float64 if backend == "cpp" else torch.float32  # triton has no float64
    reason = backends.unavailable_reason(backend, torch.device("cpu"), dtype)
    if reason:
        pytest.skip(reason)
    return build(dtype)


@pytest.mark.parametrize("op,backend", PARAMS)
def test_jvp_matches_eager(op, backend):
    fn, inputs = _case(op, backend)
    tangents = [torch.randn_like(t) for t in inputs]
    _, got = torch.func.jvp(lambda *xs: fn(*xs, backend), tuple(inputs), tuple(tangents))
    _, want = torch.func.jvp(lambda *xs: fn(*xs, "eager"), tuple(inputs), tuple(tangents))
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op,backend", PARAMS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_dual_tensors_match_eager(op, backend, grad):
    """Dual tensors with grad mode off (the tangent used to vanish) and on with an input requiring grad (it used
    to raise "You must implement the jvp function")."""
    fn, inputs = _case(op, backend)
    tangents = [torch.randn_like(t) for t in inputs]
    results = {}
    for name in (backend, "eager"):
        leaves = [t.clone().requires_grad_(grad) for t in inputs]
        with torch.set_grad_enabled(grad), fwAD.dual_level():
            out = fn(*(fwAD.make_dual(t, d) for t, d in zip(leaves, tangents)), name)
            results[name] = fwAD.unpack_dual(out).tangent
    assert results[backend] is not None
    torch.testing.assert_close(results[backend], results["eager"])


@pytest.mark.parametrize("op,backend", PARAMS)
def test_forward_mode_jacobian_matches_eager(op, backend):
    fn, inputs = _case(op, backend)
    first = inputs[0][:1]  # a small slice keeps the Jacobian small

    def of_first(x, name):
        return fn(x, *[t[:1] if t.dim() == first.dim() else t for t in inputs[1:]], name)

    got = torch.autograd.functional.jacobian(lambda x: of_first(x, backend), first, vectorize=True,
                                             strategy="forward-mode")
    want = torch.autograd.functional.jacobian(lambda x: of_first(x, "eager"), first, vectorize=True,
                                              strategy="forward-mode")
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op,backend", PARAMS)
def test_func_vjp_and_grad_match_eager(op, backend):
    fn, inputs = _case(op, backend)
    cotangent = torch.randn_like(fn(*inputs, "eager"))
    results = {}
    for name in (backend, "eager"):
        out, vjp_fn = torch.func.vjp(lambda *xs: fn(*xs, name), *inputs)
        grads = torch.func.grad(lambda *xs: (fn(*xs, name) * cotangent).sum(), argnums=tuple(range(len(inputs))))(
            *inputs)
        results[name] = (out, vjp_fn(cotangent), grads)
    (out, vjps, grads), (want_out, want_vjps, want_grads) = results[backend], results["eager"]
    torch.testing.assert_close(out, want_out)
    for got_vjp, got_grad, want, want_grad in zip(vjps, grads, want_vjps, want_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got_vjp, want)
        torch.testing.assert_close(got_grad, want_grad)
        torch.testing.assert_close(want_grad, want)


@pytest.mark.parametrize("op,backend", PARAMS)
def test_jacrev_and_vmap_match_eager(op, backend):
    fn, inputs = _case(op, backend)
    first = inputs[0][:1]
    rest = [t[:1] if t.dim() == first.dim() else t for t in inputs[1:]]
    got = torch.func.jacrev(lambda x: fn(x, *rest, backend))(first)
    want = torch.func.jacrev(lambda x: fn(x, *rest, "eager"))(first)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want)
    batched = torch.stack([inputs[0], inputs[0].flip(0)])  # vmap over a new leading dim of the first input
    got = torch.func.vmap(lambda x: fn(x, *inputs[1:], backend))(batched)
    want = torch.stack([fn(x, *inputs[1:], "eager") for x in batched])
    torch.testing.assert_close(got, want)
