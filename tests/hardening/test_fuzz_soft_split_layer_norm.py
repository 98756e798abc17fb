"""Property-based fuzzing of soft_split_layer_norm on every backend that runs here, against the float64 formula
F.layer_norm(F.unfold(x).transpose(1, 2)) on the same rounded inputs.

Random batch (incl. 0 and 1), channels, odd image sizes, kernel/stride/padding (square or not, stride > kernel,
padding up to 3, so also beyond the kernel), memory layouts (hardening_utils.SOFT_SPLIT_LAYOUTS: channels_last,
slices, token views, stride-0 broadcasts), dtypes, weight/bias present or None, fp32 parameters with fp16/bf16 x,
eps, input scale and offset, and grad modes. Output and gradients (x through its view, weight, bias) must be within
per-dtype bounds relative to the reference's magnitude (the bounds of tests/ops/test_soft_split_layer_norm.py).
A failure prints its case; rerun it with check_soft_split_layer_norm(case, backend, device) from this file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from float64_checks import SOFT_SPLIT_LAYER_NORM_TOLERANCES, TORCH_LAYER_NORM_LOW_PRECISION_TOLERANCES
from hardening_utils import (
    PADDING_WIDER_THAN_KERNEL_INPUTS, CrashProbe, DTYPE_NAMES, SOFT_SPLIT_BACKENDS, SOFT_SPLIT_LAYOUTS, SoftSplitCase,
    _pair, assert_no_crash, backend_params, count_case, draw_split_geometry, examples_for, fuzz_inputs, generator,
    padding_wider_than_kernel, probe_id, randn,
)
from t2t_kernels.ops import soft_split_layer_norm
from t2t_kernels.ops.soft_split_layer_norm import BACKENDS as SOFT_SPLIT_LAYER_NORM_BACKENDS

pytestmark = pytest.mark.usefixtures("single_intraop_thread")

KERNELS = ("cpp", "triton")
# max |error| / max(1, max |float64 reference|): 128u for fp32/fp64; for fp16/bf16 one rounding of an fp32 result (2u
# covers the Triton interpreter's truncating fp32 -> bf16 conversion): the op tests' bounds (tests/float64_checks.py)
TOLERANCES = SOFT_SPLIT_LAYER_NORM_TOLERANCES
# torch's own unfold + layer_norm in fp16/bf16 ("eager", and "cuda"'s layer_norm) sums the weight and bias gradients
# in the low precision
TORCH_LOW_PRECISION_TOLERANCES = TORCH_LAYER_NORM_LOW_PRECISION_TOLERANCES
# Conditioning: centring a token, u - mean, in the compute precision costs ~u * |mean|, i.e. kappa * u relative to
# the token's spread, kappa = max over tokens of |mean| * rstd. The bounds above hold for kappa <= 1; each tensor's
# bound gets COMPUTE_TOLERANCE * kappa added. Any LayerNorm has this error: tokens far from zero relative to their
# spread, two-feature tokens of close values, tokens with a variance far below eps (rstd = 1/sqrt(eps)). The kernels
# compute in fp32 (fp64 for fp64); torch's fp16/bf16 layer_norm backward rounds intermediates to x's dtype (measured
# up to 2.7 u_x * kappa), so for eager and cuda the term is 16 u of x's dtype.
COMPUTE_TOLERANCE = {torch.float64: 128 * 2.0**-53}
COMPUTE_TOLERANCE.update(dict.fromkeys((torch.float32, torch.float16, torch.bfloat16), 128 * 2.0**-24))
TORCH_COMPUTE_TOLERANCE = {torch.float16: 16 * 2.0**-11, torch.bfloat16: 16 * 2.0**-8}


def _op_backends(backend: str):
    # "cuda" is the CUDA soft split + torch's layer_norm: it runs where the CUDA soft split does
    return SOFT_SPLIT_BACKENDS if backend == "cuda" else SOFT_SPLIT_LAYER_NORM_BACKENDS


@dataclass(frozen=True)
class SoftSplitLayerNormCase(SoftSplitCase):
    """A soft split case (input, geometry, layout, dtype, seed, grad mode) with the layer norm's own fields."""
    params: str = "both"  # "both", "weight", "bias" or "none": which of weight and bias are given (the rest None)
    param_dtype: str = "same"  # "same" (x's dtype) or "float32" (autocast's fp32 parameters with fp16/bf16 x)
    eps: float = 1e-5
    scale: float = 1.0  # x = offset + scale * randn
    offset: float = 0.0


def _tolerance(backend: str, dtype: torch.dtype, kappa: float) -> float:
    if backend not in KERNELS and dtype in TORCH_LOW_PRECISION_TOLERANCES:
        return TORCH_LOW_PRECISION_TOLERANCES[dtype] + TORCH_COMPUTE_TOLERANCE[dtype] * kappa
    return TOLERANCES[dtype] + COMPUTE_TOLERANCE[dtype] * kappa


def layer_norm_float64(tokens, weight, bias, eps):
    """LayerNorm over the last dim from elementary float64 ops (autograd differentiates the two-pass form). Not
    F.layer_norm: its backward forms x*rstd - mean*rstd, which loses ~u64 * |mean| * rstd, enough to miss exact zeros
    (one-feature tokens) by 1e-14. Returns (normalised tokens, kappa = max |mean| * rstd)."""
    mean = tokens.mean(-1, keepdim=True)
    centred = tokens - mean
    rstd = ((centred * centred).mean(-1, keepdim=True) + eps).rsqrt()
    out = centred * rstd
    out = out * weight if weight is not None else out
    out = out + bias if bias is not None else out
    kappa = (mean.abs() * rstd).max().item() if mean.numel() else 0.0
    return out, kappa


def _check(actual, expected, tol, what, scale=None):
    assert tuple(actual.shape) == tuple(expected.shape), (what, tuple(actual.shape), tuple(expected.shape))
    if expected.numel() == 0:
        return
    if scale is None:
        scale = expected.abs().max().clamp_min(1.0).item()
    error = (actual.double() - expected).abs().nan_to_num(nan=float("inf"))
    worst = error.max().item() / scale
    assert worst <= tol, (
        f"{what}: max error {error.max().item():.3g} = {worst:.3g} x the reference's magnitude {scale:.3g} > {tol:g}; "
        f"{int((error > tol * scale).sum())} of {error.numel()} elements off, {int(actual.isnan().sum())} NaN")


@dataclass
class CaseInputs:
    """A case's drawn inputs: x's base tensor and the layout's view of it, the norm's weight and bias (None where the
    case leaves them out), the geometry as pairs, and the generator, to draw more from."""
    base: torch.Tensor
    make_view: Callable
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    k: tuple
    s: tuple
    p: tuple
    features: int
    gen: torch.Generator


def case_inputs(case: SoftSplitLayerNormCase, device: str) -> CaseInputs:
    dtype = DTYPE_NAMES[case.dtype]
    param_dtype = dtype if case.param_dtype == "same" else DTYPE_NAMES[case.param_dtype]
    B, C, H, W = case.B, case.C, case.H, case.W
    k, s, p = _pair(case.kernel_size), _pair(case.stride), _pair(case.padding)
    features = C * k[0] * k[1]
    base_shape, make_view = SOFT_SPLIT_LAYOUTS[case.layout]
    gen = generator(case.seed)
    base = (case.offset + randn(base_shape(B, C, H, W), gen, scale=case.scale)).to(dtype=dtype, device=device)
    weight = (1 + randn(features, gen, scale=0.5)).to(dtype=param_dtype, device=device)
    bias = randn(features, gen, scale=0.5, dtype=param_dtype, device=device)
    return CaseInputs(base, make_view, weight if case.params in ("both", "weight") else None,
                      bias if case.params in ("both", "bias") else None, k, s, p, features, gen)


def check_soft_split_layer_norm(case: SoftSplitLayerNormCase, backend: str, device: str = "cpu") -> None:
    """soft_split_layer_norm on `backend` against the float64 formula on the same rounded x, weight, bias, grad_out:
    the output, and the gradients of x's base tensor (through the layout's view), weight and bias."""
    dtype = DTYPE_NAMES[case.dtype]
    param_dtype = dtype if case.param_dtype == "same" else DTYPE_NAMES[case.param_dtype]
    B, C, H, W = case.B, case.C, case.H, case.W
    drawn = case_inputs(case, device)
    base, make_view, weight, bias = drawn.base, drawn.make_view, drawn.weight, drawn.bias
    k, s, p, features = drawn.k, drawn.s, drawn.p, drawn.features
    h_out, w_out = ((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip((H, W), k, s, p))
    out_shape = (B, h_out * w_out, features)

    def reference(base, weight, bias):
        x = make_view(base, B, C, H, W)
        tokens = F.unfold(x, k, padding=p, stride=s).transpose(1, 2)
        return (x, *layer_norm_float64(tokens, weight, bias, case.eps))

    params64 = [t.detach().double().cpu() if t is not None else None for t in (weight, bias)]
    if case.grad_mode != "backward":
        context = torch.no_grad() if case.grad_mode == "no_grad" else torch.inference_mode()
        with context:
            y = soft_split_layer_norm(make_view(base, B, C, H, W), case.kernel_size, case.stride, case.padding,
                                      weight, bias, case.eps, backend=backend)
        assert tuple(y.shape) == out_shape and y.dtype == dtype and y.is_contiguous()
        _, expected, kappa = reference(base.double().cpu(), *params64)
        _check(y.cpu(), expected, _tolerance(backend, dtype, kappa), "out")
        return

    leaves = [t.requires_grad_() for t in (base, weight, bias) if t is not None]
    x = make_view(base, B, C, H, W)
    assert tuple(x.shape) == (B, C, H, W)
    y = soft_split_layer_norm(x, case.kernel_size, case.stride, case.padding, weight, bias, case.eps,
                              backend=backend)
    assert tuple(y.shape) == out_shape and y.dtype == dtype and y.is_contiguous()
    grad_out = randn(out_shape, generator(case.seed + 1), dtype=dtype, device=device)
    grads = torch.autograd.grad(y, leaves, grad_out)

    leaves64 = [t.detach().double().cpu().requires_grad_() for t in leaves]
    rest = iter(leaves64[1:])
    w64, b64 = (next(rest) if weight is not None else None), (next(rest) if bias is not None else None)
    x64, expected, kappa = reference(leaves64[0], w64, b64)
    grad_x64, *expected_grads = torch.autograd.grad(expected, [x64] + leaves64, grad_out.double().cpu())
    tol = _tolerance(backend, dtype, kappa)
    _check(y.detach().cpu(), expected.detach(), tol, "out")

    # the base's gradient sums the gradients of the x elements that share it (stride-0 layouts), rounded in x's dtype:
    # its magnitude is that sum of |terms|, not |sum|
    abs_base = leaves64[0].detach().clone().requires_grad_()
    (terms,) = torch.autograd.grad(make_view(abs_base, B, C, H, W), abs_base, grad_x64.abs())
    names = ["base"] + (["weight"] if weight is not None else []) + (["bias"] if bias is not None else [])
    for name, leaf, grad, want in zip(names, leaves, grads, expected_grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, (name, grad.dtype, grad.shape)
        if name == "base":
            scale = terms.abs().max().clamp_min(1.0).item() if terms.numel() else 1.0
            _check(grad.cpu(), want, tol, "grad of x's base", scale)
        else:  # the kernels sum parameter gradients in fp32 and round once to the parameters' dtype
            grad_dtype = param_dtype if backend in KERNELS else dtype
            _check(grad.cpu(), want, _tolerance(backend, grad_dtype, kappa), f"grad of {name}")


@st.composite
def soft_split_layer_norm_cases(draw, dtypes, small: bool):
    dtype = draw(st.sampled_from([str(d).removeprefix("torch.") for d in dtypes]))
    low_precision = dtype in ("float16", "bfloat16")
    return SoftSplitLayerNormCase(
        **draw_split_geometry(draw, small),
        layout=draw(st.sampled_from(sorted(SOFT_SPLIT_LAYOUTS))),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
        params=draw(st.sampled_from(["both"] * 3 + ["weight", "bias", "none"])),
        param_dtype=draw(st.sampled_from(["same", "float32"])) if low_precision else "same",
        # eps > 0: with eps = 0 a token of one feature or one wholly in the padding has variance 0 and every backend
        # (and F.layer_norm) gives NaN; eps = 0 on random data is in tests/ops/test_soft_split_layer_norm.py
        eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.25])),
        scale=draw(st.sampled_from([1.0, 1.0, 0.05, 20.0])),
        offset=draw(st.sampled_from([0.0, 0.0, 3.0])),
        grad_mode=draw(st.sampled_from(["backward"] * 4 + ["no_grad", "inference_mode"])),
    )


def _unsupported_by_torch(case, backend) -> bool:
    """torch's layer_norm (eager, and cuda's) rejects an fp32 bias without weight for fp16/bf16 x: its backward
    raises 'expected scalar type BFloat16 but found Float'. (The fused kernels take it.)"""
    return backend not in KERNELS and case.params == "bias" and case.param_dtype == "float32"


CRASH_PROBES = (
    CrashProbe(
        name="soft_split_layer_norm with padding > kernel_size (tokens wholly inside the padding)",
        code=f"""
            from t2t_kernels.ops import soft_split_layer_norm
            from t2t_kernels.ops.soft_split_layer_norm import reference
            for shape, k, p in {PADDING_WIDER_THAN_KERNEL_INPUTS}:
                x = torch.randn(shape, device=device, requires_grad=True)
                y = soft_split_layer_norm(x, k, 1, p, backend=backend)
                ref = reference.soft_split_layer_norm(x.detach().double(), k, 1, p, None, None, 1e-5)
                assert torch.allclose(y.detach().double(), ref, atol=1e-5), (shape, k, p)
                y.backward(torch.ones_like(y))
        """,
        applies=padding_wider_than_kernel,
    ),
)


@pytest.mark.parametrize("device,backend", backend_params())
def test_soft_split_layer_norm_matches_float64(device, backend, request):
    dtypes, small, crashing = fuzz_inputs(_op_backends(backend), backend, device, CRASH_PROBES)

    # the soft split's budgets (an interpreted Triton case costs about two soft splits: forward, backward + fold)
    @settings(max_examples=examples_for(backend, device, "soft_split"))
    @given(case=soft_split_layer_norm_cases(dtypes, small))
    def run(case):
        assume(not any(probe.applies(case) for probe in crashing))
        assume(not _unsupported_by_torch(case, backend))
        count_case(request.node.nodeid, case, backend, device)
        check_soft_split_layer_norm(case, backend, device)

    run()


@pytest.mark.parametrize("probe", CRASH_PROBES, ids=probe_id)
@pytest.mark.parametrize("device,backend", backend_params())
def test_no_crash(device, backend, probe):
    """Inputs that crashed the soft split's kernels (whose gather this op shares), run in a subprocess: a crash fails
    this test, not the whole session."""
    if backend == "eager":
        pytest.skip("eager is F.unfold + F.layer_norm itself")
    assert_no_crash(probe, _op_backends(backend), backend, device)


def test_the_case_generator_covers_the_edges():
    """The generator reaches the edges: B = 1 and 0, stride > kernel, padding > kernel // 2 and > kernel, non-square
    kernels, one-feature tokens, every layout, every weight/bias combination, fp32 parameters with low-precision x,
    the grad-free modes. (Checked on a sample; a shrunk generator would fail.)"""
    seen = set()

    @settings(max_examples=300, derandomize=True)
    @given(case=soft_split_layer_norm_cases(["float32", "bfloat16"], small=False))
    def collect(case):
        k, s, p = _pair(case.kernel_size), _pair(case.stride), _pair(case.padding)
        seen.update({f"layout={case.layout}", f"grad_mode={case.grad_mode}", f"B={min(case.B, 2)}",
                     f"params={case.params}", f"param_dtype={case.param_dtype}"})
        if s[0] > k[0]:
            seen.add("stride>kernel")
        if 2 * p[0] > k[0]:
            seen.add("wide padding")
        if padding_wider_than_kernel(case):
            seen.add("padding>kernel")
        if k[0] != k[1]:
            seen.add("non-square kernel")
        if case.C * k[0] * k[1] == 1:
            seen.add("one feature")
        if case.H % 2 and case.W % 2:
            seen.add("odd image")

    collect()
    wanted = {f"layout={name}" for name in SOFT_SPLIT_LAYOUTS} | {
        "grad_mode=no_grad", "grad_mode=inference_mode", "B=0", "B=1", "stride>kernel", "wide padding",
        "padding>kernel", "non-square kernel", "one feature", "odd image", "params=both", "params=weight",
        "params=bias", "params=none", "param_dtype=same", "param_dtype=float32"}
    assert wanted <= seen, wanted - seen
