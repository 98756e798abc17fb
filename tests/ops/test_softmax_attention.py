"""softmax_attention against the float64 formula, for every backend that runs here (eager, cpp).

    q, k, v = qkv (B, N, 3*heads*head_dim) split as (3, heads, head_dim);  out = softmax(q k^T * scale) v, heads merged

The truth is the official formula (q @ k^T * scale, softmax, @ v) in float64 on the same rounded inputs and grad_out;
every backend is compared with it in the output and in the gradient of qkv (through the view that makes qkv).
Every torch.empty is NaN-filled (tests/conftest.py): an output element the kernel leaves unwritten fails.
tests/ops/test_cpu_isa.py reruns the tests selected by ``-k "cpp and (float64 or deterministic)"`` under the AVX2
and plain builds of the kernel: their shapes stay small.
"""

import pytest
import torch

import op_params
from float64_checks import assert_close_to, relative_error
from op_params import dtype_name
from t2t_kernels.ops import softmax_attention
from t2t_kernels.ops.softmax_attention import BACKENDS, reference

# Max |error| / max(1, max |float64 reference|), for out and the gradient of qkv.
# fp32/fp64: 128 units of roundoff u, as in the other suites: each output is a softmax-weighted mean of up to
# 300 values after a dot product of up to 64 terms. Measured over these shapes and layouts (4 seeds): out <= 9.5u cpp /
# 10u eager fp32 (5.7e-7), <= 18u cpp / 16u eager fp64; the gradient (the eager formula for both backends) <= 18u
# fp32, <= 22u fp64.
TOLERANCES = {torch.float64: 128 * 2.0**-53, torch.float32: 128 * 2.0**-24}
# fp16/bf16 through eager SDPA, which rounds the scores, the probabilities and the output to the input dtype:
# measured <= 0.7u out, <= 1.5u for the gradient (u = 2^-11 fp16, 2^-8 bf16; 4 seeds); bounds 8u and 32u as the
# other suites' low-precision ones. The cpp kernel takes bf16 in fp32 and rounds the output once (the gradient is the
# eager formula's).
LOW_PRECISION_TOLERANCES = {  # (out, gradient)
    torch.float16: (8 * 2.0**-11, 32 * 2.0**-11),
    torch.bfloat16: (8 * 2.0**-8, 32 * 2.0**-8),
}

DTYPES = {
    "eager": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float64, torch.float32, torch.bfloat16),
}

# (B, N, heads, head_dim): a T2T-ViT-14 block's (197 tokens, 6 heads of 64: four 64-query blocks, the last of 5, and
# 197 keys, no whole number of vectors), head_dim 48 (not a whole register block: the output goes through scratch)
# and odd ones (5, 33), one token, one head with many tokens (few heads: each head's queries split into chunks),
# exactly one vector of keys (16) and one more (17), and head_dim 1.
SHAPES = [
    (2, 197, 6, 64),
    (2, 50, 3, 48),
    (3, 7, 2, 5),
    (2, 1, 4, 8),
    (1, 300, 1, 64),
    (2, 16, 2, 16),
    (1, 17, 3, 33),
    (4, 9, 2, 1),
]


def shape_id(shape):
    return "B{}-N{}-H{}-D{}".format(*shape)


def skip_unless_available(backend, dtype=torch.float32):
    op_params.skip_unless_available(BACKENDS, backend, dtype)


def backend_dtype_params(only=None):
    return op_params.backend_dtype_params(DTYPES, only)


def formula(qkv, heads, scale):
    """The official Attention's formula, written out."""
    B, N, width = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, width // 3)


# How qkv (B, N, 3 E) is laid out: the base tensor's shape as a function of (B, N, W = 3 E), and the view of it
LAYOUTS = {
    "contiguous": (lambda B, N, W: (B, N, W), lambda t: t),
    # a column slice of a wider projection (row stride > 3 E)
    "column_slice": (lambda B, N, W: (B, N, W + 7), lambda t: t[..., 3:-4]),
    # (N, B, .) seen as (B, N, .): batch stride W, token stride B W
    "batch_transposed": (lambda B, N, W: (N, B, W), lambda t: t.transpose(0, 1)),
    # every other token
    "tokens_strided": (lambda B, N, W: (B, 2 * N, W), lambda t: t[:, ::2]),
    # the features' stride is not 1 (the wrapper copies)
    "features_strided": (lambda B, N, W: (B, W, N), lambda t: t.transpose(1, 2)),
}


def make_qkv(layout, B, N, W, dtype, scale=1.0):
    shape_of, view = LAYOUTS[layout]
    base = (scale * torch.randn(shape_of(B, N, W))).to(dtype)
    assert tuple(view(base).shape) == (B, N, W)
    return base, view


def tolerances(dtype):
    """(out, gradient)"""
    if dtype in LOW_PRECISION_TOLERANCES:
        return LOW_PRECISION_TOLERANCES[dtype]
    return TOLERANCES[dtype], TOLERANCES[dtype]


def check_against_float64(backend, base, view, heads, scale=None, grads=True):
    """softmax_attention(view(base)) on `backend` and the gradient of base against the float64 formula."""
    dtype = base.dtype
    leaf = base.detach().clone().requires_grad_(grads)
    qkv = view(leaf)
    out = softmax_attention(qkv, heads, scale, backend=None if backend == "auto" else backend)
    B, N, W = qkv.shape
    assert out.dtype == dtype and out.shape == (B, N, W // 3) and out.is_contiguous(), (out.dtype, out.stride())
    leaf64 = base.detach().double().requires_grad_(grads)
    expected = formula(view(leaf64), heads, (W // (3 * heads)) ** -0.5 if scale is None else scale)
    out_tol, grad_tol = tolerances(dtype)
    assert_close_to(out.detach(), expected.detach(), out_tol, f"{backend} {dtype_name(dtype)} out")
    errors = {"out": relative_error(out, expected.detach())}
    if grads:
        grad_out = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, leaf, grad_out)
        (want,) = torch.autograd.grad(expected, leaf64, grad_out.double())
        assert got.dtype == dtype
        assert_close_to(got, want, grad_tol, f"{backend} {dtype_name(dtype)} grad of qkv")
        errors["qkv"] = relative_error(got, want)
    return errors


# --- values and gradients against float64 ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64, torch.bfloat16)))
def test_matches_float64_reference(backend, dtype, shape):
    skip_unless_available(backend, dtype)
    B, N, H, D = shape
    check_against_float64(backend, *make_qkv("contiguous", B, N, 3 * H * D, dtype), H)


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_TOLERANCES), ids=dtype_name)
def test_low_precision_auto_matches_float64(dtype):
    """fp16 has no kernel ("auto" runs SDPA), bf16 the cpp one where the extension is loaded."""
    check_against_float64("auto", *make_qkv("contiguous", 2, 40, 3 * 4 * 16, dtype), 4)


def test_cpp_bfloat16_rounds_once():
    """bf16 in, computed in fp32: the output is the fp32 kernel's on the widened input, rounded to bf16 (so at least
    as close to the float64 formula as SDPA's bf16 path, which rounds scores and probabilities too)."""
    skip_unless_available("cpp", torch.bfloat16)
    qkv = torch.randn(2, 197, 3 * 6 * 64).bfloat16()
    got = softmax_attention(qkv, 6, backend="cpp")
    wide = softmax_attention(qkv.float(), 6, backend="cpp")
    assert got.dtype == torch.bfloat16 and torch.equal(got, wide.bfloat16())
    exact = softmax_attention(qkv.double(), 6, backend="eager")
    sdpa = softmax_attention(qkv, 6, backend="eager")
    assert (got.double() - exact).abs().max() <= (sdpa.double() - exact).abs().max()


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "contiguous"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64, torch.bfloat16)))
def test_layouts_match_float64(backend, dtype, layout):
    skip_unless_available(backend, dtype)
    check_against_float64(backend, *make_qkv(layout, 3, 70, 3 * 2 * 24, dtype), 2)


@pytest.mark.parametrize("scale", [1.0, 0.01, 3.0])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_scale_matches_float64(backend, dtype, scale):
    """An explicit scale (qk_scale in the official Attention) instead of head_dim ** -0.5."""
    skip_unless_available(backend, dtype)
    check_against_float64(backend, *make_qkv("contiguous", 2, 33, 3 * 3 * 16, dtype), 3, scale=scale)


UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_large_scores_match_float64(backend, dtype):
    """Scores in the thousands (inputs ~30x a LayerNorm's output): the max subtraction keeps exp finite, and the
    nearly one-hot rows match within the softmax's own conditioning: a score rounded to u |s| moves its probability
    by that much relative, so the bound is 2 u max|s| (measured <= 0.37 u max|s| for both backends, 4 seeds)."""
    skip_unless_available(backend, dtype)
    B, N, H, D = 2, 50, 2, 32
    qkv = (30 * torch.randn(B, N, 3 * H * D)).to(dtype)
    out = softmax_attention(qkv, H, backend=backend)
    q, k, _ = qkv.double().reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    max_score = ((q @ k.transpose(-2, -1)) * D**-0.5).abs().max().item()
    assert max_score > 1000
    assert_close_to(out, formula(qkv.double(), H, D**-0.5), 2 * UNIT_ROUNDOFF[dtype] * max_score,
                    f"{backend} {dtype_name(dtype)} out")


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_gradcheck_float64(backend):
    skip_unless_available(backend, torch.float64)
    qkv = torch.randn(2, 5, 3 * 2 * 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softmax_attention(t, 2, backend=backend), (qkv,))
    # the eager formula is SDPA, whose CPU kernel has no second derivative (as the layers' default attention); the
    # kernel's double backward differentiates the written-out formula
    if backend == "cpp":
        assert torch.autograd.gradgradcheck(lambda t: softmax_attention(t, 2, backend=backend), (qkv,))


def test_opcheck():
    skip_unless_available("cpp")
    qkv = torch.randn(2, 9, 3 * 2 * 8, requires_grad=True)
    torch.library.opcheck(torch.ops.t2t_kernels.softmax_attention, (qkv, 2, 0.3))
    torch.library.opcheck(torch.ops.t2t_kernels.softmax_attention, (qkv[:, ::2], 4, 0.5))
    for dtype in (torch.float32, torch.float64):
        qkv = torch.randn(2, 9, 3 * 2 * 8, dtype=dtype)
        torch.library.opcheck(torch.ops.t2t_kernels.softmax_attention_backward,
                              (torch.randn(2, 9, 2 * 8, dtype=dtype), qkv, 2, 0.3))
        # strided: grad_out's features (a copy in the op), qkv's tokens (read in place)
        torch.library.opcheck(torch.ops.t2t_kernels.softmax_attention_backward,
                              (torch.randn(2, 5, 4 * 8, dtype=dtype)[:, :, ::2], qkv[:, ::2], 2, 0.5))


def _backward_ops(qkv, heads):
    """The ops dispatched while the op's gradient of qkv is taken, and that gradient."""
    from op_log import OpLog

    leaf = qkv.detach().requires_grad_()
    out = softmax_attention(leaf, heads, backend="cpp")
    with OpLog() as log:
        (grad,) = torch.autograd.grad(out, leaf, torch.randn_like(out))
    return log.names, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_name)
def test_backward_runs_the_kernel_up_to_its_token_limit(dtype):
    """float32/float64 take the backward kernel up to BACKWARD_MAX_TOKENS tokens (the gradient's accuracy: the
    float64 comparisons above, which run it); longer sequences and bf16 recompute the eager formula."""
    from t2t_kernels.ops.softmax_attention import BACKWARD_MAX_TOKENS

    skip_unless_available("cpp", dtype)
    kernel = "t2t_kernels::softmax_attention_backward"
    names, _ = _backward_ops(torch.randn(2, BACKWARD_MAX_TOKENS, 3 * 2 * 4, dtype=dtype), 2)
    assert kernel in names and not any("scaled_dot_product" in n for n in names)
    names, _ = _backward_ops(torch.randn(1, BACKWARD_MAX_TOKENS + 1, 3 * 2 * 4, dtype=dtype), 2)
    assert kernel not in names and any("scaled_dot_product" in n for n in names)
    if BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.bfloat16) is None:
        names, _ = _backward_ops(torch.randn(2, 9, 3 * 2 * 4).bfloat16(), 2)
        assert kernel not in names


def test_backward_kernel_and_recompute_agree_on_long_sequences():
    """Past the token limit the recomputed formula gives the gradient (checked against float64 like the kernel's)."""
    from t2t_kernels.ops.softmax_attention import BACKWARD_MAX_TOKENS

    skip_unless_available("cpp")
    check_against_float64("cpp", *make_qkv("contiguous", 1, BACKWARD_MAX_TOKENS + 3, 3 * 2 * 8, torch.float32), 2)


def test_compile_fullgraph_cpp():
    """torch.compile(fullgraph=True) through the op: no graph break, the op in the generated code, the same values
    and gradients."""
    skip_unless_available("cpp")
    from torch._inductor.utils import run_and_get_code

    def attend(qkv):
        return softmax_attention(qkv * 2, 2, backend="cpp").sin()

    qkv = torch.randn(2, 5, 3 * 2 * 4)
    got_in, want_in = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    got, (code, *_) = run_and_get_code(torch.compile(attend, fullgraph=True), got_in)
    assert "torch.ops.t2t_kernels.softmax_attention.default(" in code, code
    want = attend(want_in)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got_in.grad, want_in.grad)


@pytest.mark.parametrize("dtype", DTYPES["cpp"], ids=dtype_name)
def test_cpp_deterministic_across_threads(dtype):
    """Bitwise the same output (and gradient) with 1 and with 2 threads (one head of 300 queries: split into chunks by the thread
    count; four heads of 70: one task each), two runs each. The thread count is restored."""
    skip_unless_available("cpp", dtype)
    threads = torch.get_num_threads()
    for B, N, H in ((1, 300, 1), (2, 70, 2)):
        qkv = torch.randn(B, N, 3 * H * 16, dtype=dtype)
        grad_out = torch.randn(B, N, H * 16, dtype=dtype)
        results = []
        for num_threads in (1, 2, 2, 1):
            torch.set_num_threads(num_threads)
            try:
                leaf = qkv.clone().requires_grad_(dtype != torch.bfloat16)  # the backward kernel: fp32/fp64
                out = softmax_attention(leaf, H, backend="cpp")
                grad = torch.autograd.grad(out, leaf, grad_out)[0] if leaf.requires_grad else None
                results.append((out.detach(), grad))
            finally:
                torch.set_num_threads(threads)
        for out, grad in results[1:]:
            assert torch.equal(results[0][0], out)
            assert grad is None or torch.equal(results[0][1], grad)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64, torch.bfloat16)))
def test_nan_stays_in_its_head(backend, dtype):
    """A NaN key poisons exactly the rows of its image and head (every query attends to every key), as torch's
    softmax; the other heads and images stay finite."""
    skip_unless_available(backend, dtype)
    B, N, H, D = 2, 20, 3, 8
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype)
    qkv[1, 7, H * D + 2 * D + 3] = float("nan")  # image 1, key of token 7, head 2
    out = softmax_attention(qkv, H, backend=backend).view(B, N, H, D)
    poisoned = torch.zeros(B, N, H, D, dtype=torch.bool)
    poisoned[1, :, 2] = True
    assert out[poisoned].isnan().all() and not out[~poisoned].isnan().any()


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("shape", [(0, 5, 12), (2, 0, 12), (2, 3, 0)], ids=["no-images", "no-tokens", "no-width"])
def test_empty(backend, shape):
    skip_unless_available(backend)
    qkv = torch.randn(shape, requires_grad=True)
    out = softmax_attention(qkv, 2, backend=backend)
    assert out.shape == (shape[0], shape[1], shape[2] // 3)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_compiled_op_empty():
    skip_unless_available("cpp")
    assert torch.ops.t2t_kernels.softmax_attention(torch.randn(0, 4, 12), 2, 1.0).shape == (0, 4, 4)
    assert torch.ops.t2t_kernels.softmax_attention(torch.randn(3, 0, 12), 2, 1.0).shape == (3, 0, 4)


@pytest.mark.parametrize("dtype", DTYPES["eager"], ids=dtype_name)
def test_auto_backend(dtype):
    want = "cpp" if dtype in DTYPES["cpp"] and BACKENDS.unavailable_reason("cpp", torch.device("cpu"), dtype) is None \
        else "eager"
    assert BACKENDS.resolve("auto", torch.empty(0, dtype=dtype)) == want


def test_eager_ops_switch(monkeypatch):
    """T2T_EAGER_OPS=softmax_attention makes "auto" run the eager formula (for A/B timing)."""
    skip_unless_available("cpp")
    probe = torch.empty(0)
    assert BACKENDS.resolve("auto", probe) == "cpp"
    monkeypatch.setenv("T2T_EAGER_OPS", "post_attention,softmax_attention")
    assert BACKENDS.resolve("auto", probe) == "eager"
    assert BACKENDS.resolve("cpp", probe) == "cpp"


def test_reference_is_the_official_formula():
    qkv = torch.randn(2, 11, 3 * 3 * 8, dtype=torch.float64)
    torch.testing.assert_close(reference.softmax_attention(qkv, 3, 0.4), formula(qkv, 3, 0.4))


def test_default_scale_is_head_dim_to_the_minus_half():
    qkv = torch.randn(2, 6, 3 * 2 * 9, dtype=torch.float64)
    torch.testing.assert_close(softmax_attention(qkv, 2), softmax_attention(qkv, 2, 1 / 3))


# --- bad input -------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param(dict(qkv=torch.randn(5, 12)), ValueError,
                 r"qkv must be \(B, N, 3\*num_heads\*head_dim\), got \(5, 12\)", id="qkv-2d"),
    pytest.param(dict(qkv=torch.randn(2, 5, 13)), ValueError, r"got \(2, 5, 13\) with num_heads=2", id="width"),
    pytest.param(dict(qkv=torch.randn(2, 5, 18), num_heads=4), ValueError, "with num_heads=4", id="width-heads"),
    pytest.param(dict(num_heads=0), ValueError, "num_heads must be a positive int, got 0", id="heads-0"),
    pytest.param(dict(num_heads=2.0), ValueError, "num_heads must be a positive int, got 2.0", id="heads-float"),
    pytest.param(dict(num_heads=True), ValueError, "num_heads must be a positive int, got True", id="heads-bool"),
    pytest.param(dict(scale=float("nan")), ValueError, "scale must be a finite number, got nan", id="scale-nan"),
    pytest.param(dict(scale=float("inf")), ValueError, "scale must be a finite number, got inf", id="scale-inf"),
    pytest.param(dict(scale=True), ValueError, "scale must be a finite number, got True", id="scale-bool"),
    pytest.param(dict(scale="0.1"), ValueError, "scale must be a finite number", id="scale-str"),
    pytest.param(dict(qkv=torch.ones(2, 5, 12, dtype=torch.int64)), TypeError,
                 "qkv must be a floating-point Tensor, got torch.int64", id="qkv-int"),
    pytest.param(dict(qkv=[[0.0] * 12]), TypeError, "qkv must be a floating-point Tensor, got list", id="qkv-list"),
]


@pytest.mark.parametrize("changes,error,match", BAD_INPUTS)
@pytest.mark.parametrize("backend", [None, "eager", "cpp"])
def test_bad_input(changes, error, match, backend):
    args = dict(qkv=torch.randn(2, 5, 12), num_heads=2, scale=None)
    args.update(changes)
    with pytest.raises(error, match=match):
        softmax_attention(**args, backend=backend)


def test_unknown_backend_is_a_clear_error():
    qkv = torch.randn(2, 5, 12)
    with pytest.raises(ValueError, match="backend must be one of"):
        softmax_attention(qkv, 2, backend="fast")
    with pytest.raises(RuntimeError, match="softmax_attention has no triton kernel"):
        softmax_attention(qkv, 2, backend="triton")
    with pytest.raises(RuntimeError, match="dtype torch.float16 is not supported by backend 'cpp'"):
        softmax_attention(qkv.half(), 2, backend="cpp")
    if BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32) is None:
        with pytest.raises(RuntimeError, match="backend 'cpp' runs on cpu tensors, got a meta tensor"):
            softmax_attention(qkv.to("meta"), 2, backend="cpp")


def test_compiled_op_rejects_bad_input():
    """The C++ op checks its arguments itself (it can be called without the Python wrapper)."""
    skip_unless_available("cpp")
    op = torch.ops.t2t_kernels.softmax_attention
    with pytest.raises(RuntimeError, match=r"qkv must be \(B, N, 3\*num_heads\*head_dim\), got \[5, 12\]"):
        op(torch.randn(5, 12), 2, 1.0)
    with pytest.raises(RuntimeError, match=r"last dim must be 3\*num_heads\*head_dim, got qkv \[2, 5, 12\] and "
                                           r"num_heads=5"):
        op(torch.randn(2, 5, 12), 5, 1.0)
    with pytest.raises(RuntimeError, match="num_heads=0"):
        op(torch.randn(2, 5, 12), 0, 1.0)
    with pytest.raises(RuntimeError, match="qkv must be float32, float64 or bfloat16, got Half"):
        op(torch.randn(2, 5, 12).half(), 2, 1.0)
    backward = torch.ops.t2t_kernels.softmax_attention_backward
    with pytest.raises(RuntimeError, match=r"grad_out must be \(B, N, num_heads\*head_dim\) = \(2, 5, 4\) in Float, "
                                           r"got \[2, 5, 12\] Float"):
        backward(torch.randn(2, 5, 12), torch.randn(2, 5, 12), 2, 1.0)
    with pytest.raises(RuntimeError, match=r"grad_out must be .* in Float, got \[2, 5, 4\] Double"):
        backward(torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 12), 2, 1.0)
    with pytest.raises(RuntimeError, match="qkv must be float32 or float64, got BFloat16"):
        backward(torch.randn(2, 5, 4).bfloat16(), torch.randn(2, 5, 12).bfloat16(), 2, 1.0)
    with pytest.raises(RuntimeError, match=r"qkv must be \(B, N, 3\*num_heads\*head_dim\), got \[2, 5, 12\] with "
                                           r"num_heads=5"):
        backward(torch.randn(2, 5, 4), torch.randn(2, 5, 12), 5, 1.0)
