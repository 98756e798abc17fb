"""soft_split_layer_norm against float64 F.layer_norm(F.unfold(x).transpose(1, 2)), for every backend that runs here.

The truth is the formula itself evaluated in float64 on the same (rounded) inputs, weight, bias and grad_out; every
backend is compared with it in the output and in the gradients of x (through the view that makes x), weight and bias.
Triton runs on CPU tensors through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), so its
shapes stay small; "cuda" (the CUDA soft split, then torch's layer_norm) and the GPU tests skip without a GPU.
Every torch.empty is NaN-filled (tests/conftest.py): an output or gradient element a kernel leaves unwritten fails.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from float64_checks import (
    SOFT_SPLIT_LAYER_NORM_TOLERANCES, TORCH_LAYER_NORM_LOW_PRECISION_TOLERANCES, assert_close_to, relative_error,
)
from op_params import backend_dtype_params, dtype_name
from soft_split_layouts import (
    LAYOUTS, PADDING_BEYOND_KERNEL, STAGE_IDS, STAGES, assert_compiles_like_eager, make_input, padding_case_id,
    shape_id,
)
from soft_split_layouts import SHAPES as SOFT_SPLIT_SHAPES  # extended below
from virtual_views import image_past_int32
from t2t_kernels.ops import soft_split_layer_norm
from t2t_kernels.ops.soft_split import BACKENDS as SOFT_SPLIT_BACKENDS
from t2t_kernels.ops.soft_split import grad_is_channels_last
from t2t_kernels.ops.soft_split_layer_norm import BACKENDS, reference

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Max |error| / max(1, max |float64 reference|), per tensor (out, grad of x, of weight, of bias): 128u for fp32/fp64,
# one rounding of the fp32 result (2u) for fp16/bf16 (tests/float64_checks.py has the measurements behind them).
TOLERANCES = SOFT_SPLIT_LAYER_NORM_TOLERANCES
# torch's own unfold + layer_norm in fp16/bf16 (backend "eager", and "cuda"'s layer_norm) is less accurate than the
# kernels: about 2x its measured errors
TORCH_LOW_PRECISION_TOLERANCES = TORCH_LAYER_NORM_LOW_PRECISION_TOLERANCES

DTYPES = {
    "eager": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
KERNELS = ("cpp", "triton")  # the backends with a fused kernel (custom ops with their own backward)
# the soft split's shapes (soft_split_layouts.SHAPES) and a wide token (C*kh*kw = 576, as in the model's later stages)
SHAPES = [*SOFT_SPLIT_SHAPES, (2, 64, 7, 6, 3, 2, 1)]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def unavailable_reason(backend, dtype=torch.float32, device="cpu"):
    # backend="cuda" is the CUDA soft split followed by torch's layer_norm (no fused kernel, so this op's BACKENDS
    # does not list it): it runs where the CUDA soft split does
    backends = SOFT_SPLIT_BACKENDS if backend == "cuda" else BACKENDS
    return backends.unavailable_reason(backend, torch.device(device), dtype)


def skip_unless_available(backend, dtype=torch.float32, device="cpu"):
    if device == "cuda" and not HAS_CUDA:  # a CUDA build of the extension lists its kernels without a GPU too
        pytest.skip("needs a CUDA device")
    reason = unavailable_reason(backend, dtype, device)
    if reason:
        pytest.skip(reason)


def device_for(backend):
    return "cuda" if backend == "cuda" else "cpu"


def make_params(features, dtype, device="cpu"):
    """Random, non-trivial weight (around 1) and bias (around 0)."""
    weight = (1 + 0.5 * torch.randn(features, device=device)).to(dtype)
    bias = (0.5 * torch.randn(features, device=device)).to(dtype)
    return weight, bias


def formula(x, k, s, p, weight, bias, eps):
    """The definition, F.layer_norm(F.unfold(x).transpose(1, 2)) over the C*kh*kw features of each token, with the
    layer norm written out in elementary ops: autograd then differentiates the two-pass form. (F.layer_norm's own
    backward forms x*rstd - mean*rstd, which in float64 still loses ~1e-14 where rstd is large, e.g. one-feature tokens
    whose exact gradient is 0; test_reference_is_the_formula ties the two together.)"""
    tokens = F.unfold(x, k, padding=p, stride=s).transpose(1, 2)
    centred = tokens - tokens.mean(-1, keepdim=True)
    out = centred * ((centred * centred).mean(-1, keepdim=True) + eps).rsqrt()
    out = out * weight if weight is not None else out
    return out + bias if bias is not None else out


def tolerance(backend, dtype):
    if backend in ("eager", "cuda") and dtype in LOW_PRECISION:
        return TORCH_LOW_PRECISION_TOLERANCES[dtype]
    return TOLERANCES[dtype]


def check_against_float64(backend, leaf, view, k, s, p, *, param_dtype=None, weight=True, bias=True, eps=1e-5):
    """soft_split_layer_norm(view(leaf)) and its gradients (leaf's through the view, weight's, bias') against the
    float64 formula on the same values. param_dtype: weight/bias dtype (default: leaf's). Returns the relative
    errors."""
    dtype, device = leaf.dtype, leaf.device
    param_dtype = param_dtype or dtype
    k, s, p = pair(k), pair(s), pair(p)
    leaf = leaf.detach().requires_grad_()
    x = view(leaf)
    B, C, H, W = x.shape
    features = C * k[0] * k[1]
    w, b = make_params(features, param_dtype, device)
    w = w.requires_grad_() if weight else None
    b = b.requires_grad_() if bias else None
    out = soft_split_layer_norm(x, k, s, p, w, b, eps, backend=backend)
    oh, ow = ((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip((H, W), k, s, p))
    assert out.dtype == dtype and tuple(out.shape) == (B, oh * ow, features) and out.is_contiguous()
    grad_out = torch.randn_like(out)
    inputs = [t for t in (leaf, w, b) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_out)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    leaf64, rest = inputs64[0], iter(inputs64[1:])
    w64, b64 = (next(rest) if weight else None), (next(rest) if bias else None)
    expected = formula(view(leaf64), k, s, p, w64, b64, eps)
    expected_grads = torch.autograd.grad(expected, inputs64, grad_out.double())

    errors = {}
    names = ["grad_x"] + (["grad_weight"] if weight else []) + (["grad_bias"] if bias else [])
    for name, actual, want, source in zip(["out"] + names, (out, *grads), (expected, *expected_grads),
                                          (leaf, *inputs)):
        is_param = name in ("grad_weight", "grad_bias")
        if name != "out":
            assert actual.dtype == source.dtype and actual.shape == source.shape, (name, actual.dtype, actual.shape)
        # the kernels accumulate parameter gradients in fp32 and round them once to the parameters' dtype;
        # torch's layer_norm (eager, cuda) is held to x's dtype's (looser) bound
        tol_dtype = param_dtype if is_param and backend in KERNELS else dtype
        errors[name] = relative_error(actual, want.detach())
        assert_close_to(actual, want.detach(), tolerance(backend, tol_dtype), f"{backend} {dtype_name(dtype)} {name}")
    return errors


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_offsets_past_int32(backend):
    """x as a view into a 4.3 GB virtual storage whose last image's offsets pass 2^31 (tests/virtual_views.py), as
    in batches of more than 2^31 elements."""
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    skip_unless_available(backend, dtype)
    check_against_float64(backend, image_past_int32(dtype), lambda t: t, 3, 2, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(DTYPES))
def test_matches_float64(backend, dtype, shape, layout):
    device = device_for(backend)
    skip_unless_available(backend, dtype, device)
    B, C, H, W, k, s, p = shape
    check_against_float64(backend, *make_input(B, C, H, W, layout, dtype, device), k, s, p)


def test_reference_is_the_formula():
    """reference.py (the eager backend) is F.layer_norm(F.unfold(x).transpose(1, 2)), and equals the written-out
    formula the tests compare with, in float64, output and gradients."""
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    inputs = (x, *make_params(3 * 7 * 5, torch.float64))
    inputs = [t.requires_grad_() for t in inputs]
    got = reference.soft_split_layer_norm(inputs[0], (7, 5), (4, 3), (2, 1), *inputs[1:], 1e-5)
    tokens = F.unfold(inputs[0], (7, 5), padding=(2, 1), stride=(4, 3)).transpose(1, 2)
    assert torch.equal(got, F.layer_norm(tokens, (105,), *inputs[1:], 1e-5))
    want = formula(inputs[0], (7, 5), (4, 3), (2, 1), *inputs[1:], 1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    grad_out = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-13 * e.abs().max().item())


# eps = 0 on triton: the interpreter (numpy) warns about 1/0 in the tile's padding rows past the last token, which
# are never stored
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
def test_eps(backend, eps):
    """eps is added to the variance inside the square root, as in F.layer_norm (0 is allowed)."""
    skip_unless_available(backend)
    check_against_float64(backend, *make_input(2, 3, 9, 8, "token_view"), 3, 2, 1, eps=eps)


# --- mixed dtypes: fp16/bf16 x with fp32 weight and bias (autocast keeps the parameters fp32) ------------------------


@pytest.mark.parametrize("layout", ["contiguous", "token_view"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)
@pytest.mark.parametrize("backend", KERNELS)
def test_fp32_params_with_low_precision_x(backend, dtype, layout):
    """Output in x's dtype; weight and bias gradients in fp32, accurate to fp32 (the kernels never round them to
    x's dtype), the output and grad of x to x's dtype."""
    skip_unless_available(backend, dtype)
    for B, C, H, W, k, s, p in (SHAPES[0], SHAPES[2], SHAPES[6]):
        errors = check_against_float64(backend, *make_input(B, C, H, W, layout, dtype), k, s, p,
                                       param_dtype=torch.float32)
        assert errors["grad_weight"] <= TOLERANCES[torch.float32] and errors["grad_bias"] <= TOLERANCES[torch.float32]


class _LayerNormDtypesAsOnCuda(torch.utils._python_dispatch.TorchDispatchMode):
    """Raises where ATen's layer_norm gets mixed dtypes, as CUDA's kernel does (CPU's accepts them): on an H100 the
    eager and "cuda" paths with bf16 tokens and fp32 parameters raised "expected scalar type BFloat16 but found
    Float"; this catches that on a CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.native_layer_norm.default, torch.ops.aten.native_layer_norm_backward.default):
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            if len(dtypes) > 1:
                raise RuntimeError(f"{func}: mixed dtypes {sorted(map(str, dtypes))} (CUDA refuses them)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)
def test_eager_path_gives_layer_norm_one_dtype(dtype):
    x = torch.randn(2, 3, 9, 8, dtype=dtype, requires_grad=True)
    weight, bias = (torch.randn(27, requires_grad=True) for _ in range(2))
    with _LayerNormDtypesAsOnCuda():
        out = soft_split_layer_norm(x, 3, 2, 1, weight, bias, backend="eager")
        out.backward(torch.randn_like(out))
    assert out.dtype == dtype and x.grad.dtype == dtype and weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)
@pytest.mark.parametrize("backend", KERNELS)
def test_fp32_bias_without_weight(backend, dtype):
    """weight=None with an fp32 bias: the bias' gradient is as accurate as with an fp32 weight (the public function
    gives the parameters a common dtype, since the ops return both gradients in the weight's). Before that fix it had
    x's precision (2e-3 for bf16). (torch's F.layer_norm rejects this combination outright.)"""
    skip_unless_available(backend, dtype)
    errors = check_against_float64(backend, *make_input(2, 3, 9, 8, "token_view", dtype), 3, 2, 1,
                                   param_dtype=torch.float32, weight=False)
    assert errors["grad_bias"] <= TOLERANCES[torch.float32], errors


@pytest.mark.parametrize("backend", KERNELS)
def test_statistics(backend):
    """The op's mean and rstd are the float64 statistics of each token (fp32 for fp16/bf16/fp32 x, fp64 for fp64)."""
    op = {"cpp": "soft_split_layer_norm", "triton": "soft_split_layer_norm_triton"}[backend]
    for dtype in DTYPES[backend]:
        skip_unless_available(backend, dtype)
        x = torch.randn(2, 3, 9, 8).to(dtype)
        w, b = make_params(27, torch.float32)
        out, mean, rstd = getattr(torch.ops.t2t_kernels, op)(x, w, b, [3, 3], [2, 2], [1, 1], 1e-5)
        stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert out.dtype == dtype and mean.dtype == stats_dtype and rstd.dtype == stats_dtype
        tokens = F.unfold(x.double(), 3, padding=1, stride=2).transpose(1, 2)
        var, mu = torch.var_mean(tokens, dim=-1, correction=0)
        tol = TOLERANCES[stats_dtype]
        assert_close_to(mean, mu, tol, f"{backend} {dtype_name(dtype)} mean")
        assert_close_to(rstd, (var + 1e-5).rsqrt(), tol, f"{backend} {dtype_name(dtype)} rstd")


# --- weight / bias None, layouts of the results ------------------------------------------------------------------


@pytest.mark.parametrize("params", ["none", "weight_only", "bias_only"])
@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_optional_weight_and_bias(backend, params):
    skip_unless_available(backend)
    weight, bias = params == "weight_only", params == "bias_only"
    for layout in ("contiguous", "token_view"):
        check_against_float64(backend, *make_input(2, 3, 10, 9, layout), 3, 2, 1, weight=weight, bias=bias)


@pytest.mark.parametrize("backend", KERNELS)
def test_none_is_ones_and_zeros(backend):
    """weight=None / bias=None give bitwise the output (and grad of x) of an explicit ones / zeros."""
    skip_unless_available(backend)
    x0 = torch.randn(2, 4, 9, 7)
    results = []
    for w, b in ((None, None), (torch.ones(36), torch.zeros(36))):
        x = x0.clone().requires_grad_()
        out = soft_split_layer_norm(x, 3, 2, 1, w, b, backend=backend)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).cos())
        results.append((out, x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", KERNELS)
def test_result_layouts(backend):
    """The output is contiguous; grad_x is channels_last for a channels_last image and for the token view (so the
    tokens' gradient comes back contiguous, no transposed copy), contiguous for a contiguous or strided image."""
    skip_unless_available(backend)
    expect_channels_last = {"contiguous": False, "channels_last": True, "token_view": True, "strided": False}
    for layout, channels_last in expect_channels_last.items():
        leaf, view = make_input(2, 6, 8, 8, layout)
        leaf.requires_grad_()
        x = view(leaf)
        assert grad_is_channels_last(x) == channels_last
        w, b = make_params(54, torch.float32)
        out = soft_split_layer_norm(x, 3, 2, 1, w, b, backend=backend)
        assert out.is_contiguous()
        (grad_x,) = torch.autograd.grad(out, x, torch.randn_like(out), retain_graph=True)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert grad_x.is_contiguous(memory_format=fmt), (layout, grad_x.stride())
        out.backward(torch.randn_like(out))
        if layout in ("contiguous", "token_view"):
            assert leaf.grad.is_contiguous(), (layout, leaf.grad.stride())


# --- autograd: gradcheck, double backward ------------------------------------------------------------------------


def gradcheck_problem(layout):
    """The cpp op as a function of float64 (leaf, weight, bias), x the `layout` view of leaf, and those inputs."""
    leaf, view = make_input(2, 2, 5, 4, layout, torch.float64)
    w, b = make_params(2 * 3 * 2, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (leaf, w, b))

    def fn(leaf, w, b):
        return soft_split_layer_norm(view(leaf), (3, 2), (2, 1), (1, 1), w, b, backend="cpp")

    return fn, inputs


@pytest.mark.parametrize("layout", ["contiguous", "token_view"])
def test_gradcheck_float64(layout):
    skip_unless_available("cpp", torch.float64)
    assert torch.autograd.gradcheck(*gradcheck_problem(layout))


@pytest.mark.parametrize("layout", ["contiguous", "token_view"])
def test_gradgradcheck_float64(layout):
    skip_unless_available("cpp", torch.float64)
    assert torch.autograd.gradgradcheck(*gradcheck_problem(layout))


def gradient_penalty_grads(backend, dtype):
    """d/d(x, weight, grad_out) of |grad_x|^2 + |grad_weight|^2 (None where the graph does not reach)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=dtype, requires_grad=True)
    w, b = (t.requires_grad_() for t in make_params(27, dtype))
    out = soft_split_layer_norm(x, 3, 2, 1, w, b, backend=backend)
    grad_out = torch.randn_like(out).requires_grad_()
    gx, gw, _ = torch.autograd.grad(out, (x, w, b), grad_out, create_graph=True)
    return torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w, grad_out), allow_unused=True)


@pytest.mark.parametrize("backend", KERNELS)
def test_double_backward_matches_eager(backend):
    """A gradient penalty through the fused op equals the same through the eager formula."""
    dtype = torch.float64 if backend == "cpp" else torch.float32
    skip_unless_available(backend, dtype)
    got, want = gradient_penalty_grads(backend, dtype), gradient_penalty_grads("eager", dtype)
    for name, g, e in zip(("x", "weight", "grad_out"), got, want):
        assert g is not None, f"the second derivative with respect to {name} is missing (graph cut)"
        torch.testing.assert_close(g, e, rtol=TOLERANCES[dtype] * 8, atol=TOLERANCES[dtype] * 8)


@pytest.mark.parametrize("backend", KERNELS)
def test_double_backward_through_grad_out(backend):
    """The part of double backward that works today: the gradient's dependence on grad_out (linear)."""
    dtype = torch.float64 if backend == "cpp" else torch.float32
    skip_unless_available(backend, dtype)
    got, want = gradient_penalty_grads(backend, dtype), gradient_penalty_grads("eager", dtype)
    torch.testing.assert_close(got[2], want[2], rtol=TOLERANCES[dtype] * 8, atol=TOLERANCES[dtype] * 8)


# --- opcheck, torch.compile -----------------------------------------------------------------------------------------


def op_names(backend):
    suffix = "_triton" if backend == "triton" else ""
    op = f"soft_split_layer_norm{suffix}"
    return getattr(torch.ops.t2t_kernels, op), getattr(torch.ops.t2t_kernels, op + "_backward")


@pytest.mark.parametrize("layout", ["contiguous", "token_view"])
@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend, layout):
    skip_unless_available(backend)
    op, backward = op_names(backend)
    leaf, view = make_input(2, 3, 7, 6, layout)
    x = view(leaf).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(27, torch.float32))
    geometry = ([3, 3], [2, 2], [1, 1])
    torch.library.opcheck(op, (x, w, b, *geometry, 1e-5))
    out, mean, rstd = op(x.detach(), w.detach(), b.detach(), *geometry, 1e-5)
    grad_out = torch.randn_like(out)
    for channels_last in (False, True):
        torch.library.opcheck(backward, (grad_out, x.detach(), w.detach(), mean, rstd, *geometry, channels_last))
    torch.library.opcheck(backward, (grad_out, x.detach(), w.detach(), mean, rstd, *geometry, False, False))


class BackwardGradX(TorchDispatchMode):
    """Records the size of the grad_x each call of the backward op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name().startswith("t2t_kernels::soft_split_layer_norm") and func.name().endswith("_backward"):
            self.sizes.append(out[0].numel())
        return out


@pytest.mark.parametrize("backend", KERNELS)
def test_parameter_grads_without_an_input_grad(backend):
    """An x that needs no gradient (the image into the first T2T layer): backward skips grad_x (the backward op's
    x_grad=False returns it empty, no fold) and the weight and bias gradients are bitwise those computed beside
    grad_x, within the float64 bound. Triton on the GPU where there is one (scripts/gpu_session.sh's op-tests
    step; passed on an H100)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else device_for(backend)
    skip_unless_available(backend, torch.float32, device)
    leaf, view = make_input(2, 3, 11, 9, "contiguous", device=device)
    w, b = make_params(27, torch.float32, device)
    geometry = ((3, 3), (2, 2), (1, 1))
    grads = {}
    for x_grad in (True, False):
        x = view(leaf.detach().clone().requires_grad_(x_grad))
        params = [w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()]
        out = soft_split_layer_norm(x, *geometry, *params, 1e-5, backend=backend)
        grad_out = torch.ones_like(out) + torch.arange(out.shape[-1], device=device) / 7.0  # the same for both runs
        with BackwardGradX() as calls:
            grads[x_grad] = torch.autograd.grad(out, ([x] if x_grad else []) + params, grad_out)[-2:]
        assert calls.sizes == [x.numel() if x_grad else 0]
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (leaf, w, b))
    expected = torch.autograd.grad(formula(view(x64), *geometry, w64, b64, 1e-5), (w64, b64),
                                   grad_out.double())
    for actual, want, name in zip(grads[False], expected, ("grad_weight", "grad_bias")):
        assert_close_to(actual, want, tolerance(backend, torch.float32), name)


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) through the token view and the op: no graph break, same values and grads."""
    skip_unless_available(backend)

    def t2t_step(tokens, image, w0, b0, w1, b1):
        B, N, C = tokens.shape
        a = soft_split_layer_norm(image, 7, 4, 2, w0, b0, backend=backend)
        b = soft_split_layer_norm(tokens.transpose(1, 2).reshape(B, C, 4, 4), 3, 2, 1, w1, b1, eps=1e-6,
                                  backend=backend)
        return a.sin().sum() + b.cos().sum()

    inputs = [torch.randn(2, 16, 5), torch.randn(2, 3, 16, 16), *make_params(147, torch.float32),
              *make_params(45, torch.float32)]
    assert_compiles_like_eager(t2t_step, inputs)


@pytest.mark.parametrize("backend", KERNELS)
def test_compiled_graphs_use_the_fused_ops(backend):
    """Under torch.compile the forward graph calls the fused op and the backward graph its fused backward (not the
    reference's unfold + layer_norm, which the op's autograd uses only for double backward)."""
    skip_unless_available(backend)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
            return make_boxed_func(gm.forward)
        return compiler

    def fn(x, w, b):
        return soft_split_layer_norm(x, 3, 2, 1, w, b, backend=backend).sin().sum()

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w, b = (t.requires_grad_() for t in make_params(27, torch.float32))
    torch.compile(fn, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")),
                  fullgraph=True)(x, w, b).backward()
    op = "soft_split_layer_norm_triton" if backend == "triton" else "soft_split_layer_norm"
    assert f"t2t_kernels.{op}.default" in graphs["forward"], graphs["forward"]
    assert f"t2t_kernels.{op}_backward.default" in graphs["backward"], graphs["backward"]
    assert not any("aten" in t and ("layer_norm" in t or "im2col" in t) for t in graphs["backward"]), graphs["backward"]


# --- edges: windows in the padding, empty batch -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
@pytest.mark.parametrize("case", [*PADDING_BEYOND_KERNEL, (3, 4, 5, 2, 4)], ids=padding_case_id)
def test_padding_dominated_windows(backend, case):
    """padding >= kernel_size: whole tokens lie in the padding (all zeros: variance 0, out = bias). With every fresh
    allocation NaN-filled, out and all gradients must be NaN-free and match float64."""
    skip_unless_available(backend)
    assert torch.empty(8).isnan().all(), "tests/conftest.py's NaN poisoning is off"
    H, W, k, s, p = case
    for layout in ("contiguous", "token_view"):
        check_against_float64(backend, *make_input(2, 3, H, W, layout), k, s, p)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_empty_batch(backend):
    skip_unless_available(backend)
    x = torch.randn(0, 3, 8, 7, requires_grad=True)
    w, b = (t.requires_grad_() for t in make_params(27, torch.float32))
    out = soft_split_layer_norm(x, 3, 2, 1, w, b, backend=backend)
    assert out.shape == (0, 16, 27) and out.dtype == x.dtype
    out.backward(torch.ones_like(out))
    assert x.grad.shape == x.shape
    for grad in (w.grad, b.grad):
        assert grad is not None and grad.dtype == torch.float32 and torch.equal(grad, torch.zeros(27))


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_inference_mode(backend):
    skip_unless_available(backend)
    x = torch.randn(2, 3, 9, 9)
    w, b = make_params(27, torch.float32)
    with torch.inference_mode():
        out = soft_split_layer_norm(x, 3, 2, 1, w, b, backend=backend)
    assert_close_to(out, formula(x.double(), 3, 2, 1, w.double(), b.double(), 1e-5), TOLERANCES[torch.float32], "out")


# --- determinism ---------------------------------------------------------------------------------------------------


def run_once(backend, x0, w0, b0, num_threads=None):
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        out = soft_split_layer_norm(x, 3, 2, 1, w, b, backend=backend)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).view(out.shape).sin().to(out.dtype))
    finally:
        torch.set_num_threads(threads)
    return out, x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_cpp_deterministic_across_threads(dtype):
    """Bitwise the same output and gradients in two runs, with 1 and with 2 threads. (2 x 32 rows of 16 windows of
    144 features: several parallel_for tasks per thread, so the partial sums of weight/bias really are split.)"""
    skip_unless_available("cpp", dtype)
    x0 = torch.randn(2, 32, 32, 16).to(dtype).permute(0, 3, 1, 2)  # channels_last, the token view's strides
    w0, b0 = make_params(144, torch.float32)
    results = [run_once("cpp", x0, w0, b0, n) for n in (1, 2, 2, 1)]
    for other in results[1:]:
        for first, second in zip(results[0], other):
            assert torch.equal(first, second)


def test_triton_deterministic():
    skip_unless_available("triton")
    x0 = torch.randn(3, 6, 9, 9)
    w0, b0 = make_params(54, torch.float32)
    first, second = run_once("triton", x0, w0, b0), run_once("triton", x0, w0, b0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- backend choice ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES["cpp"], ids=dtype_name)
def test_auto_picks_cpp_on_cpu(dtype):
    x = torch.randn(1, 2, 5, 5).to(dtype)
    expected = "cpp" if unavailable_reason("cpp", dtype) is None else "eager"
    assert BACKENDS.resolve(None, x) == expected
    assert BACKENDS.resolve("auto", x) == expected
    w, b = make_params(18, dtype)
    got = soft_split_layer_norm(x, 3, 2, 1, w, b)
    assert torch.equal(got, soft_split_layer_norm(x, 3, 2, 1, w, b, backend=expected))


# --- GPU -------------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
@pytest.mark.parametrize("stage", STAGES, ids=STAGE_IDS)
def test_cuda_model_shapes(backend, dtype, stage, param_dtype):
    skip_unless_available(backend, dtype, "cuda")
    (C, H, W), layout, k, s, p = stage
    check_against_float64(backend, *make_input(4, C, H, W, layout, dtype, device="cuda"), k, s, p,
                          param_dtype=dtype if param_dtype == "same" else torch.float32)


# --- bad input -------------------------------------------------------------------------------------------------------

_X = torch.randn(1, 3, 8, 8)  # C*kh*kw = 27 for a 3x3 kernel


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((_X[0], 3, 2, 1), {}, ValueError, r"x must be 4-D \(B, C, H, W\)"),
        ((_X[None], 3, 2, 1), {}, ValueError, r"x must be 4-D \(B, C, H, W\)"),
        ((_X.int(), 3, 2, 1), {}, TypeError, "x must be a floating-point tensor"),
        ((_X, 11, 2, 1), {}, ValueError, "kernel_size .* larger than the padded input height"),
        ((_X, 3, 0, 1), {}, ValueError, "stride must be positive"),
        ((_X, 3, 2, 1, torch.ones(28)), {}, ValueError, r"weight must have shape \(C\*kh\*kw,\) = \(27,\)"),
        ((_X, 3, 2, 1, torch.ones(3, 9)), {}, ValueError, r"weight must have shape .* got \(3, 9\)"),
        ((_X, 3, 2, 1, None, torch.ones(26)), {}, ValueError, r"bias must have shape \(C\*kh\*kw,\) = \(27,\)"),
        ((_X, 3, 2, 1, torch.ones(27, dtype=torch.int64)), {}, TypeError,
         "weight must be a floating-point Tensor or None, got torch.int64"),
        ((_X, 3, 2, 1, None, torch.ones(27, dtype=torch.bool)), {}, TypeError,
         "bias must be a floating-point Tensor or None, got torch.bool"),
        ((_X, 3, 2, 1, [1.0] * 27), {}, TypeError, "weight must be a floating-point Tensor or None, got list"),
        ((_X, 3, 2, 1, torch.ones(27, device="meta")), {}, ValueError, "weight is on meta but x is on cpu"),
        ((_X, 3, 2, 1), {"eps": -1e-5}, ValueError, "eps must be a non-negative finite number, got -1e-05"),
        ((_X, 3, 2, 1), {"eps": True}, ValueError, "eps must be a non-negative finite number, got True"),
        ((_X, 3, 2, 1), {"eps": float("nan")}, ValueError, "eps must be a non-negative finite number, got nan"),
        ((_X, 3, 2, 1), {"eps": float("inf")}, ValueError, "eps must be a non-negative finite number, got inf"),
        ((_X, 3, 2, 1), {"eps": "1e-5"}, ValueError, "eps must be a non-negative finite number"),
    ],
    ids=["x-3d", "x-5d", "x-int", "kernel-too-big", "stride-zero", "weight-shape", "weight-2d", "bias-shape",
         "weight-int", "bias-bool", "weight-list", "weight-device", "eps-negative", "eps-bool", "eps-nan", "eps-inf",
         "eps-str"],
)
@pytest.mark.parametrize("backend", [None, "eager", "cpp", "triton"])
def test_bad_input(args, kwargs, error, match, backend):
    with pytest.raises(error, match=match):
        soft_split_layer_norm(*args, **kwargs, backend=backend)


def test_bad_backend_is_a_clear_error():
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        soft_split_layer_norm(x, 3, 2, 1, backend="fast")
    with pytest.raises(RuntimeError, match="not supported by backend 'triton'"):
        soft_split_layer_norm(x.double(), 3, 2, 1, backend="triton")
    with pytest.raises(RuntimeError, match="not supported by backend 'cpp'"):  # floating, but no cpp kernel
        soft_split_layer_norm(x.to(torch.float8_e4m3fn), 3, 2, 1, backend="cpp")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            soft_split_layer_norm(x, 3, 2, 1, backend="cuda")
    if unavailable_reason("cpp") is None:
        with pytest.raises(RuntimeError, match="backend 'cpp' runs on cpu tensors, got a meta tensor"):
            soft_split_layer_norm(x.to("meta"), 3, 2, 1, backend="cpp")


def test_compiled_op_rejects_bad_input():
    """The C++ ops check their arguments themselves (they can be called without the Python wrapper)."""
    skip_unless_available("cpp")
    op, backward = op_names("cpp")
    x, (w, b), geometry = torch.randn(2, 3, 8, 8), make_params(27, torch.float32), ([3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match=r"x must be 4-D \(B, C, H, W\)"):
        op(x[0], w, b, *geometry, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be \(C\*kh\*kw,\) = \(27,\), got shape \[5\]"):
        op(x, w[:5], b, *geometry, 1e-5)
    with pytest.raises(RuntimeError, match=r"bias must be \(C\*kh\*kw,\) = \(27,\)"):
        op(x, w, b[None], *geometry, 1e-5)
    with pytest.raises(RuntimeError, match="bias must be float32, float64, bfloat16 or float16, got Int"):
        op(x, w, b.int(), *geometry, 1e-5)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="eps must be finite and non-negative"):
            op(x, w, b, *geometry, eps)
    out, mean, rstd = op(x, w, b, *geometry, 1e-5)
    grad_out = torch.randn_like(out)
    assert backward(grad_out, x, w, mean, rstd, *geometry, False)[0].shape == x.shape
    with pytest.raises(RuntimeError, match=r"mean must be \(B, L\) = \(2, 16\) of dtype Float, got shape \[2, 3\]"):
        backward(grad_out, x, w, mean[:, :3], rstd, *geometry, False)
    with pytest.raises(RuntimeError, match=r"mean must be \(B, L\) = \(2, 16\)"):
        backward(grad_out, x, w, mean.flatten(), rstd, *geometry, False)
    with pytest.raises(RuntimeError, match=r"rstd must be \(B, L\) = \(2, 16\) of dtype Float, got shape \[1, 16\]"):
        backward(grad_out, x, w, mean, rstd[:1], *geometry, False)
    with pytest.raises(RuntimeError, match="rstd must be .* of dtype Float, got shape .* of dtype Double"):
        backward(grad_out, x, w, mean, rstd.double(), *geometry, False)
    with pytest.raises(RuntimeError, match=r"grad_out must be \(B, L, C\*kh\*kw\) = \(2, 16, 27\)"):
        backward(grad_out[:, :5], x, w, mean, rstd, *geometry, False)
    with pytest.raises(RuntimeError, match=r"grad_out must be \(B, L, C\*kh\*kw\)"):  # geometry of another split
        backward(grad_out, x, w, mean, rstd, [3, 3], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="grad_out must have x's dtype Float, got Double"):
        backward(grad_out.double(), x, w, mean, rstd, *geometry, False)
    with pytest.raises(RuntimeError, match=r"weight must be \(C\*kh\*kw,\) = \(27,\)"):
        backward(grad_out, x, w[:3], mean, rstd, *geometry, False)


def test_triton_op_rejects_bad_input():
    skip_unless_available("triton")
    op, backward = op_names("triton")
    x, (w, b), geometry = torch.randn(2, 3, 8, 8), make_params(27, torch.float32), ([3, 3], [2, 2], [1, 1])
    with pytest.raises(ValueError, match=r"weight must be a floating \(27,\) tensor"):
        op(x, w[:5], b, *geometry, 1e-5)
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16"):
        op(x.double(), w, b, *geometry, 1e-5)
    with pytest.raises(ValueError, match="features exceed one tile"):  # 1024 * 9 features: a clear error, no launch
        soft_split_layer_norm(torch.randn(1, 1024, 3, 3), 3, 1, 0, backend="triton")
    out, mean, rstd = op(x, w, b, *geometry, 1e-5)
    grad_out = torch.randn_like(out)
    with pytest.raises(ValueError, match=r"mean must be float32 \(B, L\) = \(2, 16\)"):
        backward(grad_out, x, w, mean[:, :3], rstd, *geometry, False)
    with pytest.raises(ValueError, match=r"rstd must be float32 \(B, L\)"):
        backward(grad_out, x, w, mean, rstd.double(), *geometry, False)
    with pytest.raises(ValueError, match=r"grad_out must be \(B, L, C\*kh\*kw\) = \(2, 16, 27\)"):
        backward(grad_out[:, :5], x, w, mean, rstd, *geometry, False)


def test_errors_name_this_op():
    """Shape errors of the shared soft split checks carry this op's name; the triton op itself rejects a bad eps."""
    with pytest.raises(ValueError, match=r"^soft_split_layer_norm: x must be 4-D"):
        soft_split_layer_norm(torch.randn(2, 3, 8), 3, 2, 1)
    skip_unless_available("triton")
    x, w = torch.randn(1, 2, 6, 6), torch.randn(18)
    with pytest.raises(ValueError, match=r"soft_split_layer_norm \(triton\): eps"):
        torch.ops.t2t_kernels.soft_split_layer_norm_triton(x, w, w.clone(), [3, 3], [2, 2], [1, 1], -1.0)


def test_auto_under_torch_compile_on_cuda_lets_inductor_generate_the_op(monkeypatch):
    """While torch.compile traces, "auto" on a GPU runs the eager formula (inductor's generated code beat the Triton
    kernels in a T2T-ViT-14 train step on an H100); on the CPU it keeps the compiled kernel, and an explicit backend
    is taken as asked."""
    monkeypatch.setattr(type(BACKENDS), "unavailable_reason", lambda self, b, device, dtype: None)
    gpu = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    cpu = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    assert BACKENDS.resolve("auto", gpu) == "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert BACKENDS.resolve("auto", gpu) == "eager"
    assert BACKENDS.resolve(None, gpu) == "eager"
    assert BACKENDS.resolve("triton", gpu) == "triton"
    assert BACKENDS.resolve("auto", cpu) == "cpp"
