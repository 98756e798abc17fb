"""Property-based fuzzing of softmax_attention on every backend that runs here, against the float64 formula

    q, k, v = qkv (B, N, 3*heads*head_dim) split as (3, heads, head_dim);  out = softmax(q k^T * scale) v, heads merged

on the same rounded inputs. Random images (0..4), tokens (0..300), heads (1..8), head widths (1..80), scales (the
default head_dim ** -0.5 or drawn), input magnitudes, layouts of qkv (a column slice of a wider projection, the batch
transposed, tokens strided, features strided), fp32/fp64 and grad modes. The output and the gradient of qkv must be
within 128 units of roundoff relative to max(1, max |reference|) (tests/ops/test_softmax_attention.py), widened by the
softmax's own conditioning where scores are large: a score rounded to u |s| moves its probability by that much
relative, so the bound is 128 u + 2 u max|s| (the large-scores test there measured <= 0.37 u max|s|). The gradient
is also measured against the size of the terms its softmax backward cancels (gradient_terms_scale).
A failure prints its case; rerun it with check_softmax_attention(case, backend, device) from this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening_utils import (DTYPE_NAMES, backend_params, count_case, draw_dtype_seed_grad_mode, generator, randn,
                             runnable_dtypes, unit_roundoff)
from t2t_kernels.ops import softmax_attention
from t2t_kernels.ops.softmax_attention import BACKENDS as SOFTMAX_ATTENTION_BACKENDS


ROUNDOFFS = 128  # the tolerance in units of roundoff, before the scores' conditioning
# cases per backend = this * the profile's max_examples: each is a forward, a backward and the float64 formula on
# up to 4 x 8 heads x 300^2 scores
EXAMPLES_WEIGHT = 2.0

# (base shape as a function of (B, N, W = 3 E), the view of it that is qkv)
LAYOUTS = {
    "contiguous": (lambda B, N, W: (B, N, W), lambda t: t),
    "column_slice": (lambda B, N, W: (B, N, W + 5), lambda t: t[..., 2:-3]),
    "batch_transposed": (lambda B, N, W: (N, B, W), lambda t: t.transpose(0, 1)),
    "tokens_strided": (lambda B, N, W: (B, 2 * N, W), lambda t: t[:, 1::2]),
    "features_strided": (lambda B, N, W: (B, W, N), lambda t: t.transpose(1, 2)),
}


@dataclass(frozen=True)
class SoftmaxAttentionCase:
    B: int
    N: int
    heads: int
    head_dim: int
    scale: float | None  # None: head_dim ** -0.5
    magnitude: float  # the inputs' standard deviation
    layout: str
    dtype: str
    seed: int
    grad_mode: str = "backward"  # "backward", "no_grad" or "inference_mode"


def formula(qkv, heads, scale):
    B, N, width = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q @ k.transpose(-2, -1)) * scale
    return (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, width // 3), scores


def close(actual, expected, dtype, what, max_score, terms_scale=0.0):
    """max |actual - expected| <= (128 u + 2 u max|s|) * max(1, max |expected|, terms_scale)."""
    assert actual.dtype == dtype and tuple(actual.shape) == tuple(expected.shape), (what, actual.dtype, actual.shape)
    if expected.numel() == 0:
        return
    u = unit_roundoff(dtype)
    tol = ROUNDOFFS * u + 2 * u * max_score
    error = (actual.double() - expected).abs().nan_to_num(nan=float("inf")).max().item()
    error /= max(1.0, expected.abs().max().item(), terms_scale)
    assert error <= tol, (f"{what}: max error {error:.3g} x max(1, max|float64 reference|, terms {terms_scale:.3g}) "
                          f"> {tol:.3g}")


def gradient_terms_scale(qkv64, heads, scale, grad_out64):
    """The size of the terms that q's and k's gradients sum and cancel: softmax's backward forms
    dS = P (dP - rowsum(P dP)) with dP = g v^T, exactly 0 where a row's softmax is one-hot (one token: P = 1), yet
    rounded to about u |dP| per element; those roundings reach the gradients through |dS| |k| and |dS|^T |q| times
    |scale|. The bound is relative to max(P |dP|) |k| |scale| and the like (and to v's gradient P^T g)."""
    B, N, width = qkv64.shape
    q, k, v = qkv64.reshape(B, N, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    g = grad_out64.reshape(B, N, heads, width // (3 * heads)).transpose(1, 2)
    P = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    terms = P * (g @ v.transpose(-2, -1)).abs()
    sizes = [terms @ k.abs() * abs(scale), terms.transpose(-2, -1) @ q.abs() * abs(scale)]
    return max((t.max().item() for t in sizes if t.numel()), default=0.0)


def check_softmax_attention(case: SoftmaxAttentionCase, backend: str, device: str = "cpu") -> None:
    """softmax_attention on `backend` matches the float64 formula on the same values, in the output and (grad_mode
    "backward") in the gradient of qkv's base."""
    dtype = DTYPE_NAMES[case.dtype]
    shape_of, view = LAYOUTS[case.layout]
    W = 3 * case.heads * case.head_dim
    base = randn(shape_of(case.B, case.N, W), generator(case.seed), case.magnitude, dtype, device)
    grads = case.grad_mode == "backward"
    leaf = base.clone().requires_grad_(grads)
    if grads:
        out = softmax_attention(view(leaf), case.heads, case.scale, backend=backend)
    else:
        with torch.no_grad() if case.grad_mode == "no_grad" else torch.inference_mode():
            out = softmax_attention(view(leaf), case.heads, case.scale, backend=backend)
    assert tuple(out.shape) == (case.B, case.N, W // 3) and out.is_contiguous(), (out.shape, out.stride())
    leaf64 = base.detach().double().requires_grad_(grads)
    scale = case.head_dim**-0.5 if case.scale is None else case.scale
    expected, scores = formula(view(leaf64), case.heads, scale)
    max_score = scores.detach().abs().max().item() if scores.numel() else 0.0
    close(out.detach(), expected.detach(), dtype, "out", max_score)
    if grads:
        grad_out = randn(out.shape, generator(case.seed + 1), dtype=dtype, device=device)
        (got,) = torch.autograd.grad(out, leaf, grad_out)
        (want,) = torch.autograd.grad(expected, leaf64, grad_out.double())
        terms = gradient_terms_scale(view(leaf64).detach(), case.heads, scale, grad_out.double())
        close(got, want, dtype, "grad of qkv", max_score, terms)


@st.composite
def softmax_attention_cases(draw, dtypes):
    heads = draw(st.integers(1, 8))
    return SoftmaxAttentionCase(
        B=draw(st.one_of(st.integers(1, 4), st.just(0))),
        N=draw(st.one_of(st.integers(1, 300), st.sampled_from([0, 1, 16, 17, 64, 65, 197]))),
        heads=heads,
        head_dim=draw(st.one_of(st.integers(1, 80), st.sampled_from([1, 16, 64]))),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 4.0))),
        magnitude=draw(st.sampled_from([1.0, 1.0, 0.1, 5.0])),
        layout=draw(st.sampled_from(sorted(LAYOUTS))),
        **draw_dtype_seed_grad_mode(draw, dtypes),
    )


@pytest.mark.usefixtures("single_intraop_thread")
@pytest.mark.parametrize("device,backend", backend_params())
def test_softmax_attention_matches_float64_reference(device, backend, request):
    dtypes = [d for d in runnable_dtypes(SOFTMAX_ATTENTION_BACKENDS, backend, device)
              if d in (torch.float32, torch.float64)]
    if not dtypes:
        pytest.skip(f"backend {backend!r} runs neither float32 nor float64 on {device}")

    @settings(max_examples=max(1, int(round(EXAMPLES_WEIGHT * settings.default.max_examples))))
    @given(case=softmax_attention_cases(dtypes))
    def run(case):
        count_case(request.node.nodeid, case, backend, device)
        check_softmax_attention(case, backend, device)

    run()


def test_intraop_parallel_paths(intraop_threads, request):
    """With two or more intra-op threads and few heads, the cpp kernel splits each head's queries into chunks (one task
    each, packing the head's keys and values again): fuzzed on shapes where it does, against float64."""
    runnable_dtypes(SOFTMAX_ATTENTION_BACKENDS, "cpp", "cpu")
    strategy = st.builds(
        SoftmaxAttentionCase, B=st.integers(1, 2), N=st.integers(65, 400), heads=st.integers(1, 2),
        head_dim=st.sampled_from([8, 48, 64]), scale=st.none(), magnitude=st.just(1.0),
        layout=st.sampled_from(sorted(LAYOUTS)), dtype=st.sampled_from(["float32", "float64"]),
        seed=st.integers(0, 2**31 - 1), grad_mode=st.just("no_grad"))

    @settings(max_examples=max(4, settings.default.max_examples // 4))
    @given(case=strategy)
    def run(case):
        count_case(request.node.nodeid, case, "cpp", "cpu")
        check_softmax_attention(case, "cpp")

    run()


def test_the_case_generator_covers_the_edges():
    """The generator reaches no images, no tokens, one token, more than one 64-query block, one head and eight,
    head_dim 1 and a whole register block (64), both scale kinds, every layout, dtype and grad mode."""
    seen = set()

    @settings(max_examples=400, derandomize=True)
    @given(case=softmax_attention_cases([torch.float32, torch.float64]))
    def collect(case):
        seen.update({f"layout={case.layout}", f"grad_mode={case.grad_mode}", f"dtype={case.dtype}",
                     f"scale={'default' if case.scale is None else 'given'}"})
        seen.update({"B=0"} if case.B == 0 else set())
        seen.update({"N=0"} if case.N == 0 else {"N=1"} if case.N == 1 else {"N>64"} if case.N > 64 else set())
        seen.update({f"heads={case.heads}"} if case.heads in (1, 8) else set())
        seen.update({f"head_dim={case.head_dim}"} if case.head_dim in (1, 64) else set())
        seen.update({"large scores"} if case.magnitude >= 5 and math.isfinite(case.magnitude) else set())

    collect()
    wanted = ({f"layout={name}" for name in LAYOUTS} | {f"grad_mode={m}" for m in ("backward", "no_grad",
                                                                                    "inference_mode")}
              | {"dtype=float32", "dtype=float64", "scale=default", "scale=given", "B=0", "N=0", "N=1", "N>64",
                 "heads=1", "heads=8", "head_dim=1", "head_dim=64", "large scores"})
    assert wanted <= seen, wanted - seen
