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


# soft_split_layer_norm's bounds, shared by tests/ops/test_soft_split_layer_norm.py and its fuzzer:
# max |error| / max(1, max |float64 reference|), per tensor (out, grad of x, of weight, of bias).
# fp32/fp64: 128 units of roundoff (u = 2^-24, 2^-53) for sums of up to a few hundred terms; measured <= 1.1e-6 (fp32,
# ~18u) and <= 1e-15 (fp64, ~9u). fp16/bf16: the kernels compute in fp32 and round once to the output dtype, so they
# are within one rounding of the float64 result: measured <= 0.97u (u = 2^-11 fp16, 2^-8 bf16) for cpp. The bound is
# 2u because the Triton *interpreter* (the CPU runs of these tests) converts fp32 -> bf16 by truncation, not
# round-to-nearest, an error of up to 1 ulp = 2u (measured 1.9u); on a GPU the conversion rounds to nearest.
SOFT_SPLIT_LAYER_NORM_TOLERANCES = {
    torch.float64: 128 * 2.0**-53,
    torch.float32: 128 * 2.0**-24,
    torch.float16: 2 * 2.0**-11,
    torch.bfloat16: 2 * 2.0**-8 + 1e-5,
}
# torch's own unfold + layer_norm in fp16/bf16 (backend "eager", and "cuda"'s layer_norm) is less accurate than the
# kernels (it sums the weight and bias gradients in the low precision): grad of x up to 1.2e-3 (fp16) / 9.5e-3 (bf16),
# weight and bias gradients up to 4.0e-3 (fp16) / 4.2e-2 (bf16), measured over the op tests' shapes and layouts with 4
# seeds. Bounds: about 2x that.
TORCH_LAYER_NORM_LOW_PRECISION_TOLERANCES = {torch.float16: 1e-2, torch.bfloat16: 8e-2}
