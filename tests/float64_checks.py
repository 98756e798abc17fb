"""Float64 truths and the error measure the op suites and the fuzzers share (tests/ is on sys.path: its conftest.py
is there)."""
import math

import torch


def relative_error(actual, expected):
    """max |actual - expected| / max(1, max |expected|), NaN-aware (a NaN counts as an infinite error)."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(1.0)
    return ((actual.double() - expected).abs().nan_to_num(nan=float("inf")).max() / scale).item()


def assert_close_to(actual, expected, tol, what):
    assert tuple(actual.shape) == tuple(expected.shape), (what, tuple(actual.shape), tuple(expected.shape))
    assert not actual.isnan().any(), f"{what}: {int(actual.isnan().sum())} NaN elements"
    error = relative_error(actual, expected)
    assert error <= tol, f"{what}: max error {error:.3g} x max(1, max|float64 reference|) > tolerance {tol:g}"


def gelu(a):
    """The exact GELU, a/2 erfc(-a/sqrt(2)): no 1 + erf(.) cancellation in the left tail."""
    return 0.5 * a * torch.special.erfc(-a * math.sqrt(0.5))


def post_attention_formula(y, skip, proj_weight, proj_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                           fc2_bias, eps):
    """post_attention's definition in elementary ops (autograd differentiates this form, not F.layer_norm's
    backward); None parameters are left out."""
    x = skip + y @ proj_weight.T
    x = x + proj_bias if proj_bias is not None else x
    centred = x - x.mean(-1, keepdim=True)
    normed = centred * ((centred * centred).mean(-1, keepdim=True) + eps).rsqrt()
    normed = normed * norm_weight if norm_weight is not None else normed
    normed = normed + norm_bias if norm_bias is not None else normed
    a = normed @ fc1_weight.T
    a = a + fc1_bias if fc1_bias is not None else a
    out = x + gelu(a) @ fc2_weight.T
    return out + fc2_bias if fc2_bias is not None else out
