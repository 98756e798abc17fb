"""Property-based fuzzing of dropout_add on every backend that runs here.

Random shapes (0 to 3 dims, empty ones included, up to 20k elements), layouts (contiguous, transposed, strided, a
stride-0 broadcast), with or without a residual, p anywhere in [0, 1] (0, 1 and within 1e-9 of them included), any
int64 seed, every dtype and grad mode. Each backend's output and gradients must equal the eager formula's bit for
bit (one Philox mask for all), and the eager formula must be the float64 sum residual + x * mask / (1 - p) with the
product and the sum each rounded once. A failure prints its case; rerun it with check_dropout_add(case, backend,
device) from this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hardening_utils import (backend_params, count_case, draw_dtype_seed_grad_mode, examples_for, fuzz_inputs,
                             generator, randn, unit_roundoff)
from t2t_kernels.ops import DROPOUT_ADD_BACKENDS, dropout_add
from t2t_kernels.ops.dropout_add import reference

pytestmark = pytest.mark.usefixtures("single_intraop_thread")

# (base shape of a shape, the view of it with that shape)
LAYOUTS = {
    "contiguous": (lambda s: s, lambda t: t),
    "transposed": (lambda s: s[:-2] + s[-2:][::-1] if len(s) >= 2 else s,
                   lambda t: t.transpose(-1, -2) if t.dim() >= 2 else t),
    "strided": (lambda s: s[:-1] + (2 * s[-1],) if s else s, lambda t: t[..., ::2] if t.dim() else t),
    "broadcast": (lambda s: s[:-1] + (1,) if s else s, None),  # expanded along the last dim (stride 0)
}


@dataclass(frozen=True)
class DropoutAddCase:
    shape: tuple
    layout: str
    residual: bool
    p: float
    op_seed: int  # dropout_add's seed (the mask); seed below makes the tensors
    dtype: str
    seed: int
    grad_mode: str = "backward"


def _tensor(case, gen, dtype):
    base_shape, view = LAYOUTS[case.layout]
    base = randn(base_shape(case.shape), gen, dtype=dtype)
    return base.expand(case.shape) if view is None else view(base)


def check_dropout_add(case: DropoutAddCase, backend: str, device: str = "cpu") -> None:
    dtype = getattr(torch, case.dtype)
    gen = generator(case.seed)
    x = _tensor(case, gen, dtype).to(device)
    r = _tensor(case, gen, dtype).to(device) if case.residual else None
    assert tuple(x.shape) == case.shape
    backward = case.grad_mode == "backward"
    leaves = [t.detach().clone().requires_grad_(backward) for t in (x, r) if t is not None]
    x_in, r_in = leaves[0], (leaves[1] if case.residual else None)
    context = torch.inference_mode() if case.grad_mode == "inference_mode" else torch.set_grad_enabled(backward)
    with context:
        out = dropout_add(x_in, r_in, case.p, case.op_seed, backend=backend)
    want = reference.dropout_add(x, r, case.p, case.op_seed)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, want), f"differs from the eager formula in {(out != want).sum().item()} elements"
    _check_against_float64(want, x, r, case, dtype)
    if backward and out.numel():
        grad = randn(case.shape, gen, dtype=dtype).to(device)
        got = torch.autograd.grad(out, leaves, grad)
        assert torch.equal(got[0], reference.dropout_add(grad, None, case.p, case.op_seed)), "grad of x"
        if case.residual:
            assert torch.equal(got[1], grad), "grad of residual"


def _check_against_float64(out, x, r, case, dtype):
    """The eager formula: within one rounding of the product and one of the sum of the float64 value."""
    mask = reference.keep_mask(x.shape, case.p, case.op_seed, x.device) if 0 < case.p < 1 else (
        torch.full(x.shape, case.p == 0, device=x.device))
    # the scale in x's dtype (inf in float16 for p within 2^-16 of 1: a kept element is then inf, as in F.dropout)
    scale = float(torch.tensor(1 / (1 - case.p), dtype=dtype)) if case.p < 1 else 0.0
    x64 = x.double()
    dropped = torch.where(mask, x64 * scale, x64 * 0)
    exact = dropped if r is None else r.double() + dropped
    bound = 2 * unit_roundoff(dtype) * (dropped.abs() + (0 if r is None else exact.abs()))
    within = (out.double() == exact) | ((out.double() - exact).abs() <= bound)
    assert within.all(), "not the float64 formula within its roundings"


@st.composite
def dropout_add_cases(draw, dtypes):
    shape = tuple(draw(st.lists(st.one_of(st.integers(0, 9), st.integers(10, 300)), max_size=3)))
    assume(math.prod(shape) <= 20000)
    p = draw(st.one_of(st.sampled_from([0.0, 1e-9, 0.1, 0.5, 0.9, 1 - 1e-9, 1.0]), st.floats(0.0, 1.0)))
    return DropoutAddCase(shape=shape, layout=draw(st.sampled_from(sorted(LAYOUTS))), residual=draw(st.booleans()),
                          p=p, op_seed=draw(st.integers(-(2**63), 2**63 - 1)),
                          **draw_dtype_seed_grad_mode(draw, dtypes))


@pytest.mark.parametrize("device,backend", backend_params())
def test_dropout_add_matches_the_eager_formula(device, backend, request):
    dtypes, _, _ = fuzz_inputs(DROPOUT_ADD_BACKENDS, backend, device)

    @settings(max_examples=examples_for(backend, device, "dropout_add"))
    @given(case=dropout_add_cases(dtypes))
    def run(case):
        count_case(request.node.nodeid, case, backend, device)
        check_dropout_add(case, backend, device)

    run()
