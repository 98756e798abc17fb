"""Property-based fuzzing of post_attention on every backend that runs here, against the float64 formula

    x = skip + y proj_weight^T + proj_bias;  out = x + gelu(layer_norm(x) fc1_weight^T + fc1_bias) fc2_weight^T + fc2_bias

on the same rounded inputs. Random widths D, E, H (1..80), rows (0..300) split over 0 to 3 leading dims (with 0s and
1s), memory layouts of y and skip (the kqv column slice, transposed, leading dims no view flattens, row strides, a
stride-0 broadcast), each optional parameter present or None, eps, fp32/fp64 and grad modes. The output and the
gradients of every input (y and skip through their views, the parameters) must be within the bounds of
tests/ops/test_post_attention.py: 128 units of roundoff relative to max(1, max |reference|).
A failure prints its case; rerun it with check_post_attention(case, backend, device) from this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from float64_checks import post_attention_formula
from hardening_utils import DTYPE_NAMES, backend_params, count_case, generator, randn, runnable_dtypes
from t2t_kernels.ops import post_attention
from t2t_kernels.ops.post_attention import BACKENDS as POST_ATTENTION_BACKENDS
from t2t_kernels.ops.post_attention import WIDE_WEIGHT_BYTES

pytestmark = pytest.mark.usefixtures("single_intraop_thread")

# max |error| / max(1, max |float64 reference|), per tensor; see tests/ops/test_post_attention.py (measured there
# <= 6.8u for the output, <= 15u for the gradients)
TOLERANCES = {torch.float64: 128 * 2.0**-53, torch.float32: 128 * 2.0**-24}
PARAM_NAMES = ("proj_weight", "proj_bias", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight",
               "fc2_bias")
OPTIONAL = ("proj_bias", "norm_weight", "norm_bias", "fc1_bias", "fc2_bias")
# cases per backend = this * the profile's max_examples (200 in t2t-full): each is a forward, a backward and the
# float64 formula on up to 300 x 80 elements, a few ms
EXAMPLES_WEIGHT = 2.0

# (base shapes as a function of (lead, D, E), view(bases) -> (y, skip), fewest leading dims it needs)
LAYOUTS = {
    "contiguous": (lambda lead, D, E: [(*lead, D), (*lead, E)], lambda y, skip: (y, skip), 0),
    "kqv_slice": (lambda lead, D, E: [(*lead, D), (*lead, 3 * E)],
                  lambda y, kqv: (y, kqv[..., 2 * kqv.shape[-1] // 3:]), 0),
    "y_transposed": (lambda lead, D, E: [(*lead[:-1], D, lead[-1]), (*lead, E)],
                     lambda y, skip: (y.transpose(-1, -2), skip), 1),
    "both_transposed": (lambda lead, D, E: [(*lead[:-1], D, lead[-1]), (*lead[:-1], E, lead[-1])],
                        lambda y, skip: (y.transpose(-1, -2), skip.transpose(-1, -2)), 1),
    "lead_transposed": (lambda lead, D, E: [(lead[1], lead[0], *lead[2:], D), (lead[1], lead[0], *lead[2:], 2 * E)],
                        lambda y, skip: (y.transpose(0, 1), skip.transpose(0, 1)[..., skip.shape[-1] // 2:]), 2),
    "rows_strided": (lambda lead, D, E: [(*lead[:-1], 2 * lead[-1], D), (*lead[:-1], 3 * lead[-1], E)],
                     lambda y, skip: (y[..., ::2, :], skip[..., ::3, :]), 1),
    "y_expanded": (lambda lead, D, E: [(1, *lead[1:], D), (*lead, E)],
                   lambda y, skip: (y.expand(*skip.shape[:-1], y.shape[-1]), skip), 1),
}


@dataclass(frozen=True)
class PostAttentionCase:
    lead: tuple
    D: int
    E: int
    H: int
    missing: tuple  # the optional parameters passed as None
    layout: str
    eps: float
    dtype: str
    seed: int
    grad_mode: str = "backward"  # "backward", "no_grad" or "inference_mode"


def make_case_tensors(case: PostAttentionCase, device="cpu"):
    """Bases of y and skip, the view that makes them, and the parameters (None where missing), from case.seed.
    A LayerNorm over a few features is ill-conditioned for random rows (a row whose variance falls far below eps has
    its rounding amplified by up to eps^-1/2, its gradients by the square): for E <= 8, skip carries +-4 alternating
    over the features, so every row's variance is >= ~1; for E = 1 (variance always 0) the case has eps = 1."""
    dtype = DTYPE_NAMES[case.dtype]
    gen = generator(case.seed)
    shapes, view, _ = LAYOUTS[case.layout]
    lead, D, E, H = case.lead, case.D, case.E, case.H
    bases = [randn(shape, gen) for shape in shapes(lead, D, E)]
    if 2 <= E <= 8:  # in place through the view: on skip's features whatever the layout
        skip = view(*bases)[1]
        skip.mul_(0.5).add_(4.0 * torch.tensor([(-1.0) ** e for e in range(E)]))
    bases = [b.to(dtype=dtype, device=device) for b in bases]

    def uniform(*shape, fan_in):
        return ((torch.rand(*shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)).to(dtype=dtype, device=device)

    values = {
        "proj_weight": uniform(E, D, fan_in=D), "proj_bias": uniform(E, fan_in=D),
        "norm_weight": 1 + 0.5 * randn((E,), gen, dtype=dtype, device=device),
        "norm_bias": randn((E,), gen, scale=0.5, dtype=dtype, device=device),
        "fc1_weight": uniform(H, E, fan_in=E), "fc1_bias": uniform(H, fan_in=E),
        "fc2_weight": uniform(E, H, fan_in=H), "fc2_bias": uniform(E, fan_in=H),
    }
    params = [None if name in case.missing else values[name] for name in PARAM_NAMES]
    return bases, view, params


def close(actual, expected, dtype, what, terms_scale=0.0):
    """max |actual - expected| <= tolerance * max(1, max |expected|, terms_scale)."""
    assert actual.dtype == dtype and tuple(actual.shape) == tuple(expected.shape), (what, actual.dtype, actual.shape)
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item(), terms_scale)
    error = (actual.double() - expected).abs().nan_to_num(nan=float("inf")).max().item() / scale
    assert error <= TOLERANCES[dtype], (
        f"{what}: max error {error:.3g} x max(1, max|float64 reference|, row terms {terms_scale:.3g}) "
        f"> {TOLERANCES[dtype]:g}")


def row_terms_scale(y64, skip64, params64, grad_out64, eps):
    """For each parameter's gradient, a sum over the M rows of per-row terms T_r: max over its elements of
    sqrt(sum_r T_r^2), the size the sum has when the terms' signs are random. The rounding of the terms and of their
    sum grows with it, not with the sum: where the terms cancel (a single bias, H = 1, summed over 300 rows) the
    error relative to max|gradient| alone is not bounded. (y's and skip's gradients are per row: no such sum.)"""
    from torch.func import grad, vmap

    present = [p for p in params64 if p is not None]
    if y64.shape[0] == 0:
        return [0.0] * len(present)

    def row_loss(present, y, skip, g):
        it = iter(present)
        present = [next(it) if p is not None else None for p in params64]
        return (post_attention_formula(y, skip, *present, eps) * g).sum()

    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0, 0))(present, y64, skip64, grad_out64)
    return [t.square().sum(0).sqrt().max().item() for t in per_row]


def check_post_attention(case: PostAttentionCase, backend: str, device: str = "cpu") -> None:
    """post_attention on `backend` matches the float64 formula on the same values, in the output and (grad_mode
    "backward") in the gradients of y's and skip's bases and of every present parameter."""
    dtype = DTYPE_NAMES[case.dtype]
    bases, view, params = make_case_tensors(case, device)
    present = [p for p in params if p is not None]
    names = ["y", "skip"] + [n for n, p in zip(PARAM_NAMES, params) if p is not None]
    grads = case.grad_mode == "backward"
    leaves = [t.clone().requires_grad_(grads) for t in bases + present]

    def with_params(tensors):
        it = iter(tensors)
        return [next(it) if p is not None else None for p in params]

    if grads:
        out = post_attention(*view(*leaves[:2]), *with_params(leaves[2:]), eps=case.eps, backend=backend)
    else:
        context = torch.no_grad() if case.grad_mode == "no_grad" else torch.inference_mode()
        with context:
            out = post_attention(*view(*leaves[:2]), *with_params(leaves[2:]), eps=case.eps, backend=backend)
    assert tuple(out.shape) == (*case.lead, case.E), (out.shape, case.lead, case.E)
    assert out.is_contiguous(), out.stride()
    leaves64 = [t.detach().double().requires_grad_(grads) for t in leaves]
    expected = post_attention_formula(*view(*leaves64[:2]), *with_params(leaves64[2:]), case.eps)
    close(out.detach(), expected.detach(), dtype, "out")
    if not grads:
        return
    grad_out = randn(out.shape, generator(case.seed + 1), dtype=dtype, device=device)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(expected, leaves64, grad_out.double())
    y64, skip64 = (t.detach().reshape(-1, t.shape[-1]) for t in view(*leaves64[:2]))
    scales = [0.0, 0.0] + row_terms_scale(y64, skip64, with_params([t.detach() for t in leaves64[2:]]),
                                          grad_out.double().reshape(-1, case.E), case.eps)
    for name, leaf, g, w, terms in zip(names, leaves, got, want, scales):
        assert g.shape == leaf.shape, (name, g.shape, leaf.shape)
        close(g, w, dtype, f"grad of {name}", terms)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def post_attention_cases(draw, dtypes):
    rows = draw(st.one_of(st.integers(0, 300), st.sampled_from([0, 1, 64, 65, 128, 300])))
    n_lead = draw(st.integers(0, 3)) if rows == 1 else draw(st.integers(1, 3))
    lead = []
    left = rows
    for i in range(n_lead - 1):  # split the rows over the leading dims (a 0 row count: 0 in one, anything elsewhere)
        d = draw(st.sampled_from(_divisors(left))) if left else draw(st.integers(0, 3))
        lead.append(d)
        left = left // d if left else left
    lead = tuple(lead + [left]) if n_lead else ()
    if rows == 0 and 0 not in lead:
        lead = lead[:-1] + (0,)
    D, E = (draw(st.one_of(st.integers(1, 80), st.sampled_from([1, 16, 64]))) for _ in range(2))
    # a hidden width of thousands: the kernel's wide path where E is not tiny (weights above WIDE_WEIGHT_BYTES)
    H = draw(st.one_of(st.integers(1, 80), st.sampled_from([1, 16, 64]), st.integers(1700, 7000)))
    missing = tuple(name for name in OPTIONAL if draw(st.booleans()))
    layout = draw(st.sampled_from(sorted(name for name, (*_, n) in LAYOUTS.items() if len(lead) >= n)))
    return PostAttentionCase(
        lead=lead, D=D, E=E, H=H, missing=missing, layout=layout,
        eps=1.0 if E == 1 else draw(st.sampled_from([1e-5, 1e-5, 1e-6, 1e-3, 0.1])),
        dtype=draw(st.sampled_from([str(d).removeprefix("torch.") for d in dtypes])),
        seed=draw(st.integers(0, 2**31 - 1)),
        grad_mode=draw(st.sampled_from(["backward"] * 4 + ["no_grad", "inference_mode"])),
    )


@pytest.mark.parametrize("device,backend", backend_params())
def test_post_attention_matches_float64_reference(device, backend, request):
    dtypes = [d for d in runnable_dtypes(POST_ATTENTION_BACKENDS, backend, device) if d in TOLERANCES]
    if not dtypes:
        pytest.skip(f"backend {backend!r} runs neither float32 nor float64 on {device}")

    @settings(max_examples=max(1, int(round(EXAMPLES_WEIGHT * settings.default.max_examples))))
    @given(case=post_attention_cases(dtypes))
    def run(case):
        count_case(request.node.nodeid, case, backend, device)
        check_post_attention(case, backend, device)

    run()


def test_the_case_generator_covers_the_edges():
    """The generator reaches 0, 1, 2 and 3 leading dims, 0 rows, one row, rows past a 64-row task, every layout,
    D, E, H = 1, D != E, H < E and H > E, every optional parameter missing and all of them, every grad mode."""
    seen = set()

    @settings(max_examples=400, derandomize=True)
    @given(case=post_attention_cases(["float32", "float64"]))
    def collect(case):
        rows = math.prod(case.lead)
        seen.update({f"lead_dims={len(case.lead)}", f"layout={case.layout}", f"grad_mode={case.grad_mode}",
                     f"dtype={case.dtype}"})
        seen.update(f"no_{name}" for name in case.missing)
        seen.update(f"{name}=1" for name in "DEH" if getattr(case, name) == 1)
        if rows == 0:
            seen.add("rows=0")
        if rows == 1:
            seen.add("rows=1")
        if rows > 64:
            seen.add("rows>64")
        if len(case.missing) == len(OPTIONAL):
            seen.add("all_none")
        if case.D != case.E:
            seen.add("D!=E")
        seen.add("H<E" if case.H < case.E else "H>E" if case.H > case.E else "H=E")
        itemsize = 4 if case.dtype == "float32" else 8
        if (case.D * case.E + 2 * case.E * case.H) * itemsize > WIDE_WEIGHT_BYTES:
            seen.add(f"wide {case.dtype}")

    collect()
    wanted = ({f"lead_dims={n}" for n in range(4)} | {f"layout={name}" for name in LAYOUTS}
              | {f"grad_mode={m}" for m in ("backward", "no_grad", "inference_mode")}
              | {"dtype=float32", "dtype=float64", "rows=0", "rows=1", "rows>64", "all_none", "D!=E", "H<E", "H>E",
                 "D=1", "E=1", "H=1",
                 "wide float32", "wide float64"}
              | {f"no_{name}" for name in OPTIONAL})
    assert wanted <= seen, wanted - seen
