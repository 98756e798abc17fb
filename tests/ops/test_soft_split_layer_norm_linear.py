"""soft_split_layer_norm_linear against float64 linear(layer_norm(F.unfold(x).transpose(1, 2))), for the backends that
run here (eager; cpp, the fused CPU kernel, float32/float64; auto).

The truth is the formula in float64 on the same (rounded) inputs, parameters and grad_out; every backend is compared
with it in the output and in the gradients of x (through the view that makes x), the norm's weight and bias and the
Linear's weight and bias (the cpp op's backward recomputes the eager formula). Every torch.empty is NaN-filled
(tests/conftest.py): an output element the kernel leaves unwritten fails. tests/ops/test_cpu_isa.py reruns the
tests selected by ``-k "cpp and (float64 or deterministic)"`` under the AVX2 and plain builds of the kernel.
"""
import pytest
import torch
import torch.nn.functional as F

from float64_checks import assert_close_to
from op_log import OpLog
from op_params import backend_dtype_params, dtype_name
from op_params import skip_unless_available as skip_unless
from soft_split_layouts import LAYOUTS, STAGE_IDS, STAGES, make_input, shape_id
from soft_split_layouts import SHAPES as SOFT_SPLIT_SHAPES
from t2t_kernels.ops import soft_split_layer_norm, soft_split_layer_norm_linear
from t2t_kernels.ops.soft_split_layer_norm import LINEAR_BACKENDS as BACKENDS

# Max |error| / max(1, max |float64 reference|), per tensor (out and each gradient): 128 units of roundoff, as for
# soft_split_layer_norm and post_attention (a two-pass LayerNorm, then dot products of up to 576 terms of values ~1).
# Measured over these shapes and layouts and the model's stages (4 seeds): out <= 1.0e-6 fp32 (17u) cpp, 6.9e-7 (12u)
# eager, <= 2.2e-15 fp64 (20u) cpp, 7.3e-16 (7u) eager; gradients (the eager chain for every backend) <= 1.1e-6 fp32
# (19u), <= 3.2e-15 fp64 (29u).
TOLERANCES = {torch.float64: 128 * 2.0**-53, torch.float32: 128 * 2.0**-24}
DTYPES = {
    "eager": (torch.float64, torch.float32),
    "cpp": (torch.float64, torch.float32),
    "auto": (torch.float64, torch.float32),
}
# the soft split's shapes, a wide token (C*kh*kw = 576, as in the model's later stages), and rows of windows that end
# a task part-way (3 windows a row: 21 rows a task over 3 x 5 rows; 4 a row: 16 rows a task over 3 x 100 rows)
SHAPES = [*SOFT_SPLIT_SHAPES, (2, 64, 7, 6, 3, 2, 1), (3, 2, 9, 5, 3, 2, 1), (3, 2, 200, 8, 3, 2, 1)]
# output widths: the model's kqv (192 = 3 x 64, whole register tiles) and widths the kernel pads (staged rows)
WIDTHS = [192, 100, 1, 48, 7, 64, 33, 200, 5]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def skip_unless_available(backend, dtype=torch.float32):
    if backend in ("cpp", "auto"):
        skip_unless(BACKENDS, "cpp", dtype)


def make_params(features, width, dtype, bias=True):
    """LayerNorm parameters around (1, 0) and a Linear's weight and bias at nn.Linear's scale."""
    norm_weight = (1 + 0.5 * torch.randn(features)).to(dtype)
    norm_bias = (0.5 * torch.randn(features)).to(dtype)
    weight = (torch.randn(width, features) / features**0.5).to(dtype)
    return norm_weight, norm_bias, weight, (0.5 * torch.randn(width)).to(dtype) if bias else None


def formula(x, k, s, p, norm_weight, norm_bias, weight, bias, eps=1e-5):
    """The definition with the layer norm written out in elementary (two-pass) ops."""
    tokens = F.unfold(x, k, padding=p, stride=s).transpose(1, 2)
    centred = tokens - tokens.mean(-1, keepdim=True)
    normed = centred * ((centred * centred).mean(-1, keepdim=True) + eps).rsqrt()
    normed = normed * norm_weight if norm_weight is not None else normed
    normed = normed + norm_bias if norm_bias is not None else normed
    return F.linear(normed, weight, bias)


def check_against_float64(backend, leaf, view, k, s, p, width, *, grad=True, bias=True, eps=1e-5):
    """soft_split_layer_norm_linear(view(leaf)) (and with grad its gradients) against the float64 formula."""
    dtype = leaf.dtype
    k, s, p = pair(k), pair(s), pair(p)
    leaf = leaf.detach().requires_grad_(grad)
    x = view(leaf)
    B, C, H, W = x.shape
    params = [t.requires_grad_(grad) if t is not None else None
              for t in make_params(C * k[0] * k[1], width, dtype, bias)]
    out = soft_split_layer_norm_linear(x, k, s, p, *params, eps=eps, backend=backend)
    oh, ow = ((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip((H, W), k, s, p))
    assert out.dtype == dtype and tuple(out.shape) == (B, oh * ow, width) and out.is_contiguous()
    inputs = [leaf] + [t for t in params if t is not None]
    inputs64 = [t.detach().double().requires_grad_(grad) for t in inputs]
    it = iter(inputs64[1:])
    params64 = [next(it) if t is not None else None for t in params]
    expected = formula(view(inputs64[0]), k, s, p, *params64, eps)
    assert_close_to(out, expected.detach(), TOLERANCES[dtype], f"{backend} {dtype_name(dtype)} out")
    if not grad:
        return
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs64, grad_out.double())
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert g.dtype == dtype and g.shape == inputs[i].shape
        assert_close_to(g, e, TOLERANCES[dtype], f"{backend} {dtype_name(dtype)} grad {i}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(DTYPES))
def test_matches_float64(backend, dtype, shape, layout):
    skip_unless_available(backend, dtype)
    B, C, H, W, k, s, p = shape
    width = WIDTHS[SHAPES.index(shape) % len(WIDTHS)]
    # no gradient wanted: the kernel's forward (with one, its backward recomputes the eager formula: test_gradients)
    check_against_float64(backend, *make_input(B, C, H, W, layout, dtype), k, s, p, width, grad=False)


@pytest.mark.parametrize("layout", ["contiguous", "token_view"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(DTYPES))
def test_gradients_match_float64(backend, dtype, layout):
    skip_unless_available(backend, dtype)
    check_against_float64(backend, *make_input(2, 3, 17, 13, layout, dtype), (7, 5), (4, 3), (2, 1), 100)


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_name)
def test_model_stages_match_float64(stage, dtype):
    """T2T-ViT-14's three soft splits at 224x224 (B=2) into its kqv width, 192 (stage 2 feeds the project Linear in the
    model; the op takes it all the same)."""
    skip_unless_available("cpp", dtype)
    (C, H, W), layout, k, s, p = stage
    check_against_float64("cpp", *make_input(2, C, H, W, layout, dtype), k, s, p, 192, grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_name)
def test_without_bias_matches_float64(dtype):
    skip_unless_available("cpp", dtype)
    check_against_float64("cpp", *make_input(2, 4, 11, 9, "channels_last", dtype), 2, 3, 1, 33, grad=False,
                          bias=False)


def test_missing_norm_parameters_are_ones_and_zeros():
    skip_unless_available("cpp")
    x = torch.randn(2, 3, 12, 10)
    _, _, weight, bias = make_params(27, 50, torch.float32)
    got = soft_split_layer_norm_linear(x, 3, 2, 1, None, None, weight, bias, backend="cpp")
    want = soft_split_layer_norm_linear(x, 3, 2, 1, torch.ones(27), torch.zeros(27), weight, bias, backend="cpp")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
def test_eps(eps):
    """eps is added to the variance inside the square root (0 allowed); with eps > 0, constant tokens (variance 0,
    where eps alone decides the result) are among them."""
    skip_unless_available("cpp")
    leaf, view = make_input(2, 3, 16, 16, "contiguous")
    if eps > 0:
        leaf[..., :8, :8] = 0.25
    check_against_float64("cpp", leaf, view, 3, 2, 1, 40, grad=False, eps=eps)


def test_constant_tokens_without_eps_are_nan_as_in_torch():
    """A constant token with eps = 0 normalises to 0 * inf = NaN in F.layer_norm; its output row is NaN here too, and
    only its row."""
    skip_unless_available("cpp")
    x = torch.randn(2, 3, 16, 16)
    x[..., :8, :8] = 0.25
    params = make_params(27, 40, torch.float32)
    got = soft_split_layer_norm_linear(x, 3, 2, 1, *params, eps=0.0, backend="cpp")
    want = F.linear(F.layer_norm(F.unfold(x, 3, padding=1, stride=2).transpose(1, 2), (27,), *params[:2], eps=0.0),
                    *params[2:])
    assert want.isnan().any() and not want.isnan().all()
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_deterministic_across_thread_counts():
    """Each token's products sum in one order whatever thread ran its task: bitwise the same on 1 and 2 threads."""
    skip_unless_available("cpp")
    x = torch.randn(3, 64, 14, 14)
    params = make_params(576, 192, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = soft_split_layer_norm_linear(x, 3, 2, 1, *params, backend="cpp")
        torch.set_num_threads(2)
        two = soft_split_layer_norm_linear(x, 3, 2, 1, *params, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_gradcheck_float64():
    skip_unless_available("cpp", torch.float64)
    leaf, view = make_input(2, 2, 5, 4, "token_view", torch.float64)
    inputs = (leaf, *make_params(12, 5, torch.float64))
    inputs = tuple(t.requires_grad_() for t in inputs)

    def fn(leaf, norm_weight, norm_bias, weight, bias):
        return soft_split_layer_norm_linear(view(leaf), (3, 2), (2, 1), (1, 1), norm_weight, norm_bias, weight, bias,
                                            backend="cpp")

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    skip_unless_available("cpp")
    leaf, view = make_input(2, 3, 9, 7, "channels_last")
    x = view(leaf).requires_grad_()
    params = [t.requires_grad_() if t is not None else None for t in make_params(27, 20, torch.float32, bias)]
    torch.library.opcheck(torch.ops.t2t_kernels.soft_split_layer_norm_linear,
                          (x, *params, [3, 3], [2, 2], [1, 1], 1e-5))


def test_compile_fullgraph():
    skip_unless_available("cpp")
    x = torch.randn(2, 3, 16, 16)
    params = make_params(147, 64, torch.float32)

    def fn(x):
        return soft_split_layer_norm_linear(x, 7, 4, 2, *params, backend="cpp")

    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_name)
def test_auto_composes_what_the_kernel_does_not_take(dtype):
    """Low-precision x goes through soft_split_layer_norm (its cpp kernel), then F.linear."""
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    params = make_params(147, 64, dtype)
    want = F.linear(soft_split_layer_norm(x, 7, 4, 2, *params[:2]), *params[2:])
    torch.testing.assert_close(soft_split_layer_norm_linear(x, 7, 4, 2, *params), want, rtol=0, atol=0)


@pytest.mark.parametrize("request_", ["soft_split_layer_norm_linear", "soft_split_layer_norm", "all"])
def test_eager_ops_switch_reaches_the_fused_kernel(request_, monkeypatch):
    """T2T_EAGER_OPS naming this op runs soft_split_layer_norm (auto) and then the product; naming
    soft_split_layer_norm (which this op fuses) or all runs the formula (no custom op); another op's name leaves the
    kernel."""
    skip_unless_available("cpp")
    x = torch.randn(2, 3, 16, 16)
    params = make_params(147, 64, torch.float32)
    with OpLog() as log:
        fused = soft_split_layer_norm_linear(x, 7, 4, 2, *params)
    assert "t2t_kernels::soft_split_layer_norm_linear" in log.names
    monkeypatch.setenv("T2T_EAGER_OPS", request_)
    with OpLog() as log:
        out = soft_split_layer_norm_linear(x, 7, 4, 2, *params)
    kernels = [n for n in log.names if n.startswith("t2t_kernels::")]
    if request_ == "soft_split_layer_norm_linear":
        assert kernels == ["t2t_kernels::soft_split_layer_norm"], log.names
        want = F.linear(soft_split_layer_norm(x, 7, 4, 2, *params[:2]), *params[2:])
    else:
        assert not kernels, log.names
        want = soft_split_layer_norm_linear(x, 7, 4, 2, *params, backend="eager")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(out, fused, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("T2T_EAGER_OPS", "performer_attention")
    with OpLog() as log:
        soft_split_layer_norm_linear(x, 7, 4, 2, *params)
    assert "t2t_kernels::soft_split_layer_norm_linear" in log.names


def test_bad_arguments_name_the_argument_and_shapes():
    x = torch.randn(2, 3, 16, 16)
    nw, nb, w, b = make_params(147, 64, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be a 2-D Tensor \(N, C\*kh\*kw\) = \(N, 147\).*\(64, 146\)"):
        soft_split_layer_norm_linear(x, 7, 4, 2, nw, nb, w[:, 1:], b)
    with pytest.raises(ValueError, match=r"bias must be None or a Tensor of shape \(64,\).*got \(63,\)"):
        soft_split_layer_norm_linear(x, 7, 4, 2, nw, nb, w, b[1:])
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(C\*kh\*kw,\) = \(147,\)"):
        soft_split_layer_norm_linear(x, 7, 4, 2, nw[1:], nb, w, b)
    with pytest.raises(ValueError, match="kernel_size"):
        soft_split_layer_norm_linear(x, 0, 4, 2, nw, nb, w, b)
    with pytest.raises(ValueError, match="eps"):
        soft_split_layer_norm_linear(x, 7, 4, 2, nw, nb, w, b, eps=-1.0)
    skip_unless_available("cpp")
    with pytest.raises(TypeError, match=r"backend='cpp' takes every tensor in x's dtype, got x torch.float32, "
                                        r"norm_weight torch.float64"):
        soft_split_layer_norm_linear(x, 7, 4, 2, nw.double(), nb, w, b, backend="cpp")
    with pytest.raises(RuntimeError, match="bfloat16"):
        soft_split_layer_norm_linear(x.bfloat16(), 7, 4, 2, nw, nb, w, b, backend="cpp")
    op = torch.ops.t2t_kernels.soft_split_layer_norm_linear
    with pytest.raises(RuntimeError, match=r"weight must be \(N, C\*kh\*kw\) = \(N, 147\), got shape \[64, 146\]"):
        op(x, nw, nb, w[:, 1:], b, [7, 7], [4, 4], [2, 2], 1e-5)
    with pytest.raises(RuntimeError, match=r"bias must be \(N,\) = \(64,\) for weight of shape \[64, 147\], got shape "
                                           r"\[63\]"):
        op(x, nw, nb, w, b[1:], [7, 7], [4, 4], [2, 2], 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a CPU tensor of x's dtype Float, got Double"):
        op(x, nw, nb, w.double(), b, [7, 7], [4, 4], [2, 2], 1e-5)
