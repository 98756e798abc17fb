"""Property-based fuzzing of soft_split_layer_norm_linear (the cpp kernel, and eager) against the float64 formula
F.linear(layer_norm(F.unfold(x).transpose(1, 2))) on the same rounded inputs.

The soft split + LayerNorm fuzzer's cases (geometry, layouts, norm weight/bias present or None, eps, input scale and
offset; float32/float64, the kernel's dtypes) with an output width of 1 to 200 and a bias present or None, run without
gradients (the kernel is the forward; its backward recomputes the eager formula, fuzzed with the split + LayerNorm's).
The output must be within the split + LayerNorm's bounds (conditioning term included) relative to its magnitude: the
product's weights are at nn.Linear's scale, so they carry the normalised tokens' error over at about its size.
A failure prints its case; rerun it with check_soft_split_layer_norm_linear(case, width, bias, backend, device).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening_utils import backend_params, count_case, examples_for, fuzz_inputs, randn
from test_fuzz_soft_split_layer_norm import (SoftSplitLayerNormCase, _check, _tolerance, case_inputs,
                                             layer_norm_float64, soft_split_layer_norm_cases)
from t2t_kernels.ops import soft_split_layer_norm_linear
from t2t_kernels.ops.soft_split_layer_norm import LINEAR_BACKENDS

pytestmark = pytest.mark.usefixtures("single_intraop_thread")

FUZZED_DTYPES = (torch.float32, torch.float64)  # the kernel's


def check_soft_split_layer_norm_linear(case: SoftSplitLayerNormCase, width: int, bias: bool, backend: str,
                                       device: str = "cpu") -> None:
    dtype = getattr(torch, case.dtype)
    B, C, H, W = case.B, case.C, case.H, case.W
    drawn = case_inputs(case, device)  # x and the norm's parameters as the split + LayerNorm fuzzer draws them
    base, make_view, norm_weight, norm_bias = drawn.base, drawn.make_view, drawn.weight, drawn.bias
    k, s, p, features, gen = drawn.k, drawn.s, drawn.p, drawn.features, drawn.gen
    weight = randn((width, features), gen, scale=features**-0.5, dtype=dtype, device=device)
    lin_bias = randn(width, gen, scale=0.5, dtype=dtype, device=device) if bias else None
    context = torch.no_grad() if case.grad_mode == "no_grad" else torch.inference_mode()
    with context:
        out = soft_split_layer_norm_linear(make_view(base, B, C, H, W), case.kernel_size, case.stride, case.padding,
                                           norm_weight, norm_bias, weight, lin_bias, case.eps, backend=backend)
    h_out, w_out = ((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip((H, W), k, s, p))
    assert tuple(out.shape) == (B, h_out * w_out, width) and out.dtype == dtype and out.is_contiguous()
    x64 = make_view(base.double().cpu(), B, C, H, W)
    tokens = F.unfold(x64, k, padding=p, stride=s).transpose(1, 2)
    params64 = [t.double().cpu() if t is not None else None for t in (norm_weight, norm_bias, weight, lin_bias)]
    normed, kappa = layer_norm_float64(tokens, *params64[:2], case.eps)
    _check(out.cpu(), F.linear(normed, *params64[2:]), _tolerance("cpp", dtype, kappa), "out")


@st.composite
def linear_cases(draw, dtypes, small):
    case = draw(soft_split_layer_norm_cases(dtypes, small))
    case = dataclasses.replace(case, grad_mode=draw(st.sampled_from(["no_grad", "inference_mode"])))
    return case, draw(st.sampled_from([192, 64, 1, 7, 48, 100, 200])), draw(st.booleans())


@pytest.mark.parametrize("device,backend", backend_params())
def test_soft_split_layer_norm_linear_matches_float64(device, backend, request):
    dtypes, small, _ = fuzz_inputs(LINEAR_BACKENDS, backend, device)
    dtypes = [d for d in dtypes if d in FUZZED_DTYPES]
    if not dtypes:
        pytest.skip(f"{backend} takes none of {FUZZED_DTYPES} here")

    @settings(max_examples=examples_for(backend, device, "soft_split"))
    @given(drawn=linear_cases(dtypes, small))
    def run(drawn):
        case, width, bias = drawn
        count_case(request.node.nodeid, case, backend, device)
        check_soft_split_layer_norm_linear(case, width, bias, backend, device)

    run()
