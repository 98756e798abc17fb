"""Shared pieces of the hardening tests: backend discovery, fuzz cases (plain dataclasses whose repr reruns them),
and the float64 checks each case must pass.

A failing hypothesis example prints as e.g. ``case=SoftSplitCase(B=1, C=2, ...)``; rerun it alone with
``check_soft_split(SoftSplitCase(B=1, C=2, ...), backend="cpp", device="cpu")`` (same for check_performer).
The tensor data come from ``case.seed``, so the printed case is the whole input.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st

from t2t_kernels.ops import performer_attention, soft_split
from t2t_kernels.ops.performer_attention import BACKENDS as PERFORMER_BACKENDS  # noqa: F401  (for the tests)
from t2t_kernels.ops.performer_attention import reference as performer_reference
from t2t_kernels.ops.soft_split import BACKENDS as SOFT_SPLIT_BACKENDS  # noqa: F401  (for the tests)

ALL_BACKENDS = ("eager", "cpp", "cuda", "triton")
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in ALL_DTYPES}
DEVICES = ("cpu", "cuda")

# Generated cases per backend = weight * the profile's max_examples (100 in t2t-full, 25 in t2t-ci). The Triton
# interpreter (CPU, TRITON_INTERPRET=1) is ~100x slower than the C++ kernels, so it gets fewer, smaller cases.
_WEIGHTS = {"eager": 8.0, "cpp": 10.0, "cuda": 10.0, "triton": 5.0}
# (the interpreter runs each Triton program instance in Python: the Performer's four kernels cost the most)
_INTERPRETED_TRITON_WEIGHT = {"soft_split": 2.0, "performer_attention": 1.0}


def examples_for(backend: str, device: str, op: str) -> int:
    interpreted = backend == "triton" and device == "cpu"
    weight = _INTERPRETED_TRITON_WEIGHT[op] if interpreted else _WEIGHTS[backend]
    return max(1, int(round(weight * settings.default.max_examples)))


def backend_params():
    """(device, backend) pairs for pytest.mark.parametrize: every backend the package knows, on cpu and cuda.
    Whether one runs is decided at test time (runnable_dtypes), so kernels that land later are covered."""
    return [pytest.param(dev, b, id=f"{dev}-{b}") for dev in DEVICES for b in ALL_BACKENDS]


def runnable_dtypes(op_backends, backend: str, device: str) -> list[torch.dtype]:
    """The dtypes `backend` runs for this op on `device`; skips the test (with every reason) when there are none."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reasons = {d: op_backends.unavailable_reason(backend, torch.device(device), d) for d in ALL_DTYPES}
    dtypes = [d for d, why in reasons.items() if why is None]
    if not dtypes:
        pytest.skip("; ".join(sorted({why for why in reasons.values()})))
    if backend == "triton" and importlib.util.find_spec(f"t2t_kernels.ops.{op_backends.name}.triton") is None:
        # the dispatcher advertises triton whenever triton imports; the op's kernel module is not written yet
        pytest.skip(f"t2t_kernels/ops/{op_backends.name}/triton.py does not exist (yet)")
    return dtypes


def draw_dtype_seed_grad_mode(draw, dtypes) -> dict:
    """The last fields of a fuzz case, drawn in this order: dtype (a name, one of `dtypes`), the tensor seed and the
    grad mode (backward in 4 of 6 cases)."""
    return dict(dtype=draw(st.sampled_from([str(d).removeprefix("torch.") for d in dtypes])),
                seed=draw(st.integers(0, 2**31 - 1)),
                grad_mode=draw(st.sampled_from(["backward"] * 4 + ["no_grad", "inference_mode"])))


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
            torch.bfloat16: 2.0**-8}[dtype]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, gen, scale=1.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Fresh random values (never zeros), drawn on the CPU from `gen` so a case is the same on every device."""
    return (scale * torch.randn(shape, generator=gen)).to(dtype=dtype, device=device)


# --- soft split -------------------------------------------------------------------------------------------------

# How x (B, C, H, W) is laid out in memory. Each maps a leaf `base` to the x view; the gradient lands in base.
SOFT_SPLIT_LAYOUTS = {
    "contiguous": (lambda B, C, H, W: (B, C, H, W), lambda base, B, C, H, W: base),
    "channels_last": (lambda B, C, H, W: (B, H, W, C), lambda base, B, C, H, W: base.permute(0, 3, 1, 2)),
    "hw_transposed": (lambda B, C, H, W: (B, C, W, H), lambda base, B, C, H, W: base.transpose(2, 3)),
    # a strided window into a bigger tensor: storage offset, row stride 2, odd strides everywhere
    "sliced": (lambda B, C, H, W: (B + 1, C + 2, 2 * H + 1, W + 3),
               lambda base, B, C, H, W: base[1:, 1:C + 1, 1::2, 2:W + 2]),
    # the model's token view: tokens (B, N, C) -> transpose -> view (B, C, h, w), no copy
    "tokens": (lambda B, C, H, W: (B, H * W, C), lambda base, B, C, H, W: base.transpose(1, 2).view(B, C, H, W)),
    # the same from a column slice of a wider token tensor (as the kqv split leaves it)
    "token_slice": (lambda B, C, H, W: (B, H * W, 3 * C),
                    lambda base, B, C, H, W: base[:, :, C:2 * C].transpose(1, 2).view(B, C, H, W)),
    # stride 0: one image broadcast over the batch, one column broadcast over the width
    "expanded_batch": (lambda B, C, H, W: (1, C, H, W), lambda base, B, C, H, W: base.expand(B, C, H, W)),
    "expanded_width": (lambda B, C, H, W: (B, C, H, 1), lambda base, B, C, H, W: base.expand(B, C, H, W)),
}


def _expansion(layout: str, B: int, W: int) -> int:
    """How many elements of x share one element of base (the gradient sums that many terms)."""
    return {"expanded_batch": B, "expanded_width": W}.get(layout, 1)


@dataclass(frozen=True)
class SoftSplitCase:
    B: int
    C: int
    H: int
    W: int
    kernel_size: tuple | int
    stride: tuple | int
    padding: tuple | int
    layout: str
    dtype: str
    seed: int
    grad_mode: str = "backward"  # "backward", "no_grad" or "inference_mode"


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def check_soft_split(case: SoftSplitCase, backend: str, device: str = "cpu") -> None:
    """soft_split on `backend` equals F.unfold(...).transpose(1, 2) exactly (a pure copy), and its input gradient
    equals float64 autograd of the same to within the rounding of its sums (elementwise bound)."""
    dtype = DTYPE_NAMES[case.dtype]
    B, C, H, W = case.B, case.C, case.H, case.W
    base_shape, make_view = SOFT_SPLIT_LAYOUTS[case.layout]
    gen = generator(case.seed)
    base = randn(base_shape(B, C, H, W), gen, dtype=dtype, device=device)
    k, s, p = _pair(case.kernel_size), _pair(case.stride), _pair(case.padding)
    h_out, w_out = ((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip((H, W), k, s, p))
    out_shape = (B, h_out * w_out, C * k[0] * k[1])

    if case.grad_mode != "backward":
        context = torch.no_grad() if case.grad_mode == "no_grad" else torch.inference_mode()
        with context:
            y = soft_split(make_view(base, B, C, H, W), case.kernel_size, case.stride, case.padding, backend=backend)
        expected = F.unfold(make_view(base.double(), B, C, H, W), k, padding=p, stride=s).transpose(1, 2)
        _check_soft_split_output(y, expected, out_shape, dtype)
        return

    base.requires_grad_(True)
    x = make_view(base, B, C, H, W)
    assert tuple(x.shape) == (B, C, H, W)
    y = soft_split(x, case.kernel_size, case.stride, case.padding, backend=backend)
    grad_out = randn(out_shape, gen, dtype=dtype, device=device)
    y.backward(grad_out)

    base64 = base.detach().double().requires_grad_(True)
    expected = F.unfold(make_view(base64, B, C, H, W), k, padding=p, stride=s).transpose(1, 2)
    expected.backward(grad_out.double())
    _check_soft_split_output(y.detach(), expected.detach(), out_shape, dtype)

    # |error| of a sum of n terms rounded in `dtype` <= n * u * sum|terms| (+ one rounding of the result)
    abs_base = base.detach().double().requires_grad_(True)
    F.unfold(make_view(abs_base, B, C, H, W), k, padding=p, stride=s).transpose(1, 2).backward(grad_out.double().abs())
    terms = math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1]) * _expansion(case.layout, B, W)
    bound = (terms + 1) * unit_roundoff(dtype) * abs_base.grad + 1e-300
    assert base.grad is not None and base.grad.dtype == dtype and base.grad.shape == base.shape
    error = (base.grad.double() - base64.grad).abs()
    worst = (error / bound).nan_to_num(nan=float("inf")).max().item() if error.numel() else 0.0
    assert worst <= 1.0, (
        f"grad of x off by {worst:.3g} x the rounding bound; max error {error.max().item():.3g}, "
        f"{int((error > bound).sum())} of {error.numel()} elements")


def _check_soft_split_output(y, expected, out_shape, dtype):
    assert tuple(y.shape) == out_shape, (tuple(y.shape), out_shape)
    assert y.dtype == dtype and y.is_contiguous()
    # a soft split copies values: it must be exact (NaN from a poisoned, unwritten element fails too)
    mismatch = (y.double() != expected) | y.isnan()
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} of {y.numel()} output elements differ; first at index "
        f"{tuple(mismatch.nonzero()[0].tolist())}")


# --- performer attention --------------------------------------------------------------------------------------

# How q, k, v (*lead, T, E) are laid out. Each maps a leaf `base` to (q, k, v); the gradients land in base.
PERFORMER_LAYOUTS = {
    "contiguous": (lambda lead, T, E: (3, *lead, T, E), lambda base: base.unbind(0)),
    # the model's case: non-contiguous thirds of one (..., T, 3E) tensor (the kqv Linear's output)
    "kqv_split": (lambda lead, T, E: (*lead, T, 3 * E), lambda base: base.chunk(3, dim=-1)),
    # E is the slow dimension (stride(-1) != 1): the op must copy or handle it
    "transposed": (lambda lead, T, E: (3, *lead, E, T), lambda base: base.transpose(-1, -2).unbind(0)),
    # every other token of a longer sequence
    "token_strided": (lambda lead, T, E: (3, *lead, 2 * T, E), lambda base: base[..., ::2, :].unbind(0)),
    # stride 0 over the first leading dim: one sequence broadcast over the batch
    "expanded": (lambda lead, T, E: (3, *((1,) + tuple(lead[1:]) if lead else ()), T, E),
                 lambda base: base.unbind(0)),
    # self-attention on one tensor: q, k and v are the same object
    "aliased": (lambda lead, T, E: (*lead, T, E), lambda base: (base, base, base)),
}


@dataclass(frozen=True)
class PerformerCase:
    lead: tuple
    T: int
    E: int
    m: int
    scale: float  # inputs are scale * randn; the exponent x.w - |x|^2/2 grows with scale^2 * E
    layout: str
    w_layout: str  # "contiguous" or "transposed" (a (E, m) tensor seen as (m, E))
    w_dtype: str  # "float32" or "same" (the dtype of q, as after model.half())
    eps: float
    dtype: str
    seed: int
    grad_mode: str = "backward"


# (rtol, atol) against float64 math on the same rounded inputs; atol is scaled by max(1, max |reference|)
PERFORMER_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def _performer_inputs(case: PerformerCase, dtype, device):
    gen = generator(case.seed)
    base_shape, unpack = PERFORMER_LAYOUTS[case.layout]
    base = randn(base_shape(case.lead, case.T, case.E), gen, scale=case.scale, dtype=dtype, device=device)
    w_dtype = dtype if case.w_dtype == "same" else torch.float32
    w = torch.nn.init.orthogonal_(torch.empty(case.m, case.E), generator=gen) * math.sqrt(case.m)
    w = w.to(w_dtype)
    if case.w_layout == "transposed":
        w = w.t().contiguous().t()
    return base, unpack, w.to(device)


def _expand(case, q, k, v):
    if case.layout == "expanded" and case.lead:
        shape = (*case.lead, case.T, case.E)
        return q.expand(shape), k.expand(shape), v.expand(shape)
    return q, k, v


def check_performer(case: PerformerCase, backend: str, device: str = "cpu") -> None:
    """performer_attention on `backend` matches the float64 eager reference (on the same rounded q, k, v, w), in y
    and in the gradients of q, k, v, within per-dtype tolerances scaled by the reference's magnitude."""
    dtype = DTYPE_NAMES[case.dtype]
    base, unpack, w = _performer_inputs(case, dtype, device)
    shape = (*case.lead, case.T, case.E)
    rtol, atol = PERFORMER_TOLERANCES[dtype]

    def close(actual, expected, what):
        assert actual.dtype == dtype and tuple(actual.shape) == tuple(expected.shape), (what, actual.dtype, actual.shape)
        scale = expected.abs().max().clamp_min(1.0).item() if expected.numel() else 1.0
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")

    if case.grad_mode != "backward":
        context = torch.no_grad() if case.grad_mode == "no_grad" else torch.inference_mode()
        with context:
            y = performer_attention(*_expand(case, *unpack(base)), w, eps=case.eps, backend=backend)
        expected = performer_reference.performer_attention(
            *_expand(case, *unpack(base.double())), w.double(), case.eps)
        assert tuple(y.shape) == shape
        close(y, expected, "y")
        return

    base.requires_grad_(True)
    q, k, v = _expand(case, *unpack(base))
    y = performer_attention(q, k, v, w, eps=case.eps, backend=backend)
    assert tuple(y.shape) == shape
    grad_y = randn(shape, generator(case.seed + 1), dtype=dtype, device=device)
    y.backward(grad_y)

    base64 = base.detach().double().requires_grad_(True)
    expected = performer_reference.performer_attention(*_expand(case, *unpack(base64)), w.double(), case.eps)
    expected.backward(grad_y.double())
    close(y.detach(), expected.detach(), "y")
    assert base.grad is not None
    close(base.grad, base64.grad, "grad of q, k, v (their common base)")


# --- bookkeeping: how many generated cases each fuzz test ran (printed in the terminal summary) -----------------

CASE_COUNTS: dict[str, int] = {}


# A kernel that crashes the process takes pytest with it, before hypothesis can print the case: each case is
# written here first, so the one that crashed can be read back and rerun.
LAST_CASE_FILE = os.environ.get("T2T_FUZZ_LAST_CASE", os.path.join(tempfile.gettempdir(), "t2t_fuzz_last_case.txt"))


def count_case(test_id: str, case=None, backend: str = "", device: str = "") -> None:
    CASE_COUNTS[test_id] = CASE_COUNTS.get(test_id, 0) + 1
    if case is not None:
        with open(LAST_CASE_FILE, "w") as f:
            f.write(f"{test_id}\nbackend={backend!r} device={device!r}\n{case!r}\n")


# --- crashes: probed in a subprocess, so a segfaulting kernel fails one test instead of killing the run ----------


@dataclass(frozen=True)
class CrashProbe:
    """A known way to crash a kernel. `code` runs with `backend` and `device` defined; `applies(case)` says
    whether a fuzz case belongs to it. While the probe crashes, the fuzz tests leave such cases out (and say so)
    and the probe's own test fails; once fixed, the fuzz tests cover them again automatically."""

    name: str
    code: str
    applies: object  # case -> bool


def run_snippet(code: str, backend: str, device: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with `backend` and `device` bound, TRITON_INTERPRET as in the tests."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    prelude = f"import torch\nbackend, device = {backend!r}, {device!r}\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@functools.cache
def probe_crash(probe: CrashProbe, backend: str, device: str) -> str | None:
    """None when the probe's code exits cleanly, else how it died (signal or exit code, last lines of stderr)."""
    result = run_snippet(probe.code, backend, device)
    if result.returncode == 0:
        return None
    how = f"killed by signal {-result.returncode}" if result.returncode < 0 else f"exit code {result.returncode}"
    return f"{probe.name} on backend={backend!r} ({device}): {how}; stderr: {result.stderr.strip()[-500:]}"


def draw_split_geometry(draw, small: bool) -> dict:
    """A soft split's batch, channels, image and geometry for a fuzz case: square or not, stride below or above the
    kernel, padding up to 3, an image at least as large as the padded kernel; each of kernel_size, stride, padding
    given as an int, a tuple or a list (the ops take all three)."""
    square = draw(st.booleans())
    max_k = 4 if small else 7
    k = (draw(st.integers(1, max_k)),) * 2 if square else (draw(st.integers(1, max_k)), draw(st.integers(1, max_k)))
    s = (draw(st.integers(1, 9)),) * 2 if square else (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    p = (draw(st.integers(0, 3)),) * 2 if square else (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    extra = 6 if small else 13
    H, W = (draw(st.integers(max(1, kk - 2 * pp), max(1, kk - 2 * pp) + extra)) for kk, pp in zip(k, p))

    def as_arg(pair):
        form = draw(st.sampled_from(["int", "tuple", "list"] if pair[0] == pair[1] else ["tuple", "list"]))
        return pair[0] if form == "int" else tuple(pair) if form == "tuple" else list(pair)

    return dict(B=draw(st.integers(0, 2 if small else 3)), C=draw(st.integers(1, 3 if small else 5)), H=H, W=W,
                kernel_size=as_arg(k), stride=as_arg(s), padding=as_arg(p))


def padding_wider_than_kernel(case) -> bool:
    return any(p > k for p, k in zip(_pair(case.padding), _pair(case.kernel_size)))


# (x shape, kernel_size, padding) at stride 1 with windows wholly inside the padding: inputs that crashed the soft
# split's kernels, probed on every op that shares its gather
PADDING_WIDER_THAN_KERNEL_INPUTS = [((1, 1, 3, 6), 1, (2, 0)), ((2, 3, 5, 6), 3, (4, 0)), ((2, 3, 5, 6), 3, (0, 4)),
                                    ((1, 2, 4, 4), (1, 2), 3)]

SOFT_SPLIT_CRASH_PROBES = (
    CrashProbe(
        name="soft_split with padding > kernel_size (windows wholly inside the padding)",
        code=f"""
            from t2t_kernels.ops import soft_split
            import torch.nn.functional as F
            for shape, k, p in {PADDING_WIDER_THAN_KERNEL_INPUTS}:
                x = torch.randn(shape, device=device, requires_grad=True)
                y = soft_split(x, k, 1, p, backend=backend)
                ref = F.unfold(x.detach().double(), k, padding=p, stride=1).transpose(1, 2)
                assert torch.equal(y.detach().double(), ref), (shape, k, p)
                y.backward(torch.ones_like(y))
        """,
        applies=padding_wider_than_kernel,
    ),
)


def quarantined(probes, backend: str, device: str) -> list:
    """The probes that crash `backend` now (each probed once per session, in a subprocess)."""
    if backend == "eager":
        return []
    return [probe for probe in probes if probe_crash(probe, backend, device)]


def probe_id(probe: CrashProbe) -> str:
    """A crash probe's pytest id: its name up to the parenthesis, spaces as underscores."""
    return probe.name.split(" (")[0].replace(" ", "_")


def fuzz_inputs(op_backends, backend: str, device: str, probes=()) -> tuple[list, bool, list]:
    """What a fuzz test of `backend` draws from: the dtypes it runs (skips the test when none), whether cases must be
    small (interpreted Triton), and the crash probes whose cases it must leave out (each named in a warning)."""
    dtypes = runnable_dtypes(op_backends, backend, device)
    small = backend == "triton" and device == "cpu"  # interpreted Triton: small images, short sequences
    crashing = quarantined(probes, backend, device)
    for probe in crashing:  # test_no_crash reports these as failures; in the fuzz test they would kill the whole run
        warnings.warn(f"fuzzing {backend} without cases that crash it: {probe_crash(probe, backend, device)}",
                      stacklevel=2)
    return dtypes, small, crashing


def assert_no_crash(probe: CrashProbe, op_backends, backend: str, device: str) -> None:
    """The probe's code exits cleanly on `backend` (skips where the op does not run there); probed in a subprocess,
    so a crash fails one test, not the whole session."""
    runnable_dtypes(op_backends, backend, device)
    crash = probe_crash(probe, backend, device)  # cached: the fuzz test may have probed already
    assert crash is None, crash
