"""post_attention against the float64 formula, for every backend that runs here (eager, cpp).

    x = skip + y proj_weight^T + proj_bias
    out = x + gelu(layer_norm(x) fc1_weight^T + fc1_bias) fc2_weight^T + fc2_bias

The truth is the formula written out in elementary float64 ops (two-pass LayerNorm, GELU through erfc so neither tail
cancels) on the same rounded inputs and grad_out; every backend is compared with it in the output and in the
gradients of all ten inputs (y and skip through the views that make them, and the eight parameters).
Every torch.empty is NaN-filled (tests/conftest.py): an output element the kernel leaves unwritten fails.
tests/ops/test_cpu_isa.py reruns the tests selected by ``-k "cpp and (float64 or deterministic or gelu)"`` under the
AVX2 and plain builds of the kernel: their shapes stay at a few hundred rows.
"""
import math

import pytest
import torch

import op_params
from float64_checks import assert_close_to, gelu, post_attention_formula, relative_error
from op_params import dtype_name
from t2t_kernels.ops import post_attention
from t2t_kernels.ops._onednn import ONEDNN_ENV, ONEDNN_LINEAR_REGISTERED, onednn_linear_applies
from t2t_kernels.ops.post_attention import BACKENDS, WIDE_WEIGHT_BYTES, reference

LOW_PRECISION = (torch.float16, torch.bfloat16)
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# Max |error| / max(1, max |float64 reference|), per tensor (out and each gradient).
# fp32/fp64: 128 units of roundoff u, as in the other suites: the chain is three dot products of up to 1152 terms
# (whose rounding grows like sqrt(n) u for random signs), a two-pass LayerNorm and the GELU, all with gains ~1 for
# nn.Linear-scaled weights. Measured over these shapes (4 seeds): out <= 5.7u cpp / 4.9u eager fp32 (3.4e-7 at
# E=384/H=1152, ~2.5e-7 at width 64), <= 6.1u cpp / 2u eager fp64 (6.7e-16); gradients (the same eager chain for
# both backends) <= 14.5u fp32 (8.7e-7), <= 16u fp64 (1.8e-15). The hardening fuzz sees <= 4.6u / 34u over ~3000
# random cases.
TOLERANCES = {torch.float64: 128 * 2.0**-53, torch.float32: 128 * 2.0**-24}
# fp16/bf16 run through eager torch (no kernel), which rounds every intermediate (x, the norm, fc1, gelu, fc2, the
# sum) to the input dtype: the output is off by a few roundings, measured <= 1.9u (u = 2^-11 fp16, 2^-8 bf16); the
# gradients of the norm's weight and bias are sums over the rows of products of rounded intermediates, measured
# <= 8.4u (300 rows), every other gradient <= 1.7u. Bounds: 4x the measured maxima (8u and 32u).
LOW_PRECISION_TOLERANCES = {  # (out, gradients)
    torch.float16: (8 * 2.0**-11, 32 * 2.0**-11),
    torch.bfloat16: (8 * 2.0**-8, 32 * 2.0**-8),
}

DTYPES = {
    "eager": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float64, torch.float32),
}
PARAM_NAMES = ("proj_weight", "proj_bias", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight",
               "fc2_bias")
OPTIONAL = ("proj_bias", "norm_weight", "norm_bias", "fc1_bias", "fc2_bias")

# (leading dims, D, E, H): the model's token layers (64 wide, 300 rows: several 64-row tasks and a partial one), a
# backbone layer (E=384, H=1152, few rows) and an odd-width one of 201 rows (both above WIDE_WEIGHT_BYTES: the kernel's
# whole-matrix path), odd widths that are no multiple of a vector (5/7/11, 33/17/70, D=H=1),
# D != E, H < E and H > E, one row, rows that end a task with one row left over (129), (B, T), 3 leading dims and
# none at all (y (D,), skip (E,)). E >= 6 here: a LayerNorm over one to a few features is ill-conditioned for random
# rows (test_narrow_norm_matches_float64 covers E = 1 and 2).
SHAPES = [
    ((3, 100), 64, 64, 64),
    ((4,), 384, 384, 1152),
    ((3, 67), 200, 150, 1001),
    ((2, 25), 5, 7, 11),
    ((37,), 33, 17, 70),
    ((2, 9), 64, 24, 96),
    ((5, 13), 48, 40, 16),
    ((1,), 64, 64, 64),
    ((129,), 64, 64, 64),
    ((2, 3, 5), 12, 20, 36),
    ((), 9, 6, 13),
    ((70,), 1, 9, 1),
]


def shape_id(shape):
    lead, D, E, H = shape
    return ("x".join(map(str, lead)) or "nolead") + f"-D{D}-E{E}-H{H}"


def skip_unless_available(backend, dtype=torch.float32):
    op_params.skip_unless_available(BACKENDS, backend, dtype)


def backend_dtype_params(only=None):
    return op_params.backend_dtype_params(DTYPES, only)


def make_params(D, E, H, dtype, missing=()):
    """The eight parameters as nn.Linear and nn.LayerNorm would hold them after some training: weights and biases
    uniform in +-1/sqrt(fan_in), the norm's weight around 1 and bias around 0; None for the names in `missing`."""
    def uniform(*shape, fan_in):
        return (torch.rand(*shape) * 2 - 1) / math.sqrt(max(fan_in, 1))

    values = {
        "proj_weight": uniform(E, D, fan_in=D), "proj_bias": uniform(E, fan_in=D),
        "norm_weight": 1 + 0.5 * torch.randn(E), "norm_bias": 0.5 * torch.randn(E),
        "fc1_weight": uniform(H, E, fan_in=E), "fc1_bias": uniform(H, fan_in=E),
        "fc2_weight": uniform(E, H, fan_in=H), "fc2_bias": uniform(E, fan_in=H),
    }
    return [None if name in missing else values[name].to(dtype) for name in PARAM_NAMES]


# How y (*lead, D) and skip (*lead, E) are laid out: base tensors (the leaves, where the gradients land) and the view
# that makes y and skip of them. Each entry: (base shapes as a function of (lead, D, E), view(bases) -> (y, skip)).
LAYOUTS = {
    "contiguous": (lambda lead, D, E: [(*lead, D), (*lead, E)], lambda y, skip: (y, skip)),
    # the model's: skip is v, the last third of the kqv Linear's (..., 3E) output; y is the attention's (new) output
    "kqv_slice": (lambda lead, D, E: [(*lead, D), (*lead, 3 * E)],
                  lambda y, kqv: (y, kqv[..., 2 * kqv.shape[-1] // 3:])),
    # D is the slow dimension of y (stride(-1) != 1)
    "y_transposed": (lambda lead, D, E: [(*lead[:-1], D, lead[-1]), (*lead, E)],
                     lambda y, skip: (y.transpose(-1, -2), skip)),
    # both transposed
    "both_transposed": (lambda lead, D, E: [(*lead[:-1], D, lead[-1]), (*lead[:-1], E, lead[-1])],
                        lambda y, skip: (y.transpose(-1, -2), skip.transpose(-1, -2))),
    # leading dims that no view flattens: (T, B, .) seen as (B, T, .); skip also a column slice
    "lead_transposed": (lambda lead, D, E: [(lead[1], lead[0], *lead[2:], D), (lead[1], lead[0], *lead[2:], 2 * E)],
                        lambda y, skip: (y.transpose(0, 1), skip.transpose(0, 1)[..., skip.shape[-1] // 2:])),
    # every other row of y, every third of skip: row strides 2D and 3E (a view, but not of unit row stride)
    "rows_strided": (lambda lead, D, E: [(*lead[:-1], 2 * lead[-1], D), (*lead[:-1], 3 * lead[-1], E)],
                     lambda y, skip: (y[..., ::2, :], skip[..., ::3, :])),
    # y broadcast over the first leading dim (stride 0): its gradient sums over it
    "y_expanded": (lambda lead, D, E: [(1, *lead[1:], D), (*lead, E)],
                   lambda y, skip: (y.expand(*skip.shape[:-1], y.shape[-1]), skip)),
}


def make_input(layout, lead, D, E, dtype, scale=1.0):
    """Bases (randn * scale, in `dtype`) and the view that makes (y, skip) of them."""
    shapes, view = LAYOUTS[layout]
    bases = [(scale * torch.randn(shape)).to(dtype) for shape in shapes(lead, D, E)]
    y, skip = view(*bases)
    assert tuple(y.shape) == (*lead, D) and tuple(skip.shape) == (*lead, E), (layout, y.shape, skip.shape)
    return bases, view


def tolerances(dtype):
    """(out, gradients)"""
    if dtype in LOW_PRECISION:
        return LOW_PRECISION_TOLERANCES[dtype]
    return TOLERANCES[dtype], TOLERANCES[dtype]


def check_against_float64(backend, bases, view, params, eps=1e-5, grads=True):
    """post_attention(*view(*bases), *params) on `backend` ("auto" for None) and the gradients of the bases and the
    present parameters against the float64 formula on the same values. Returns the relative errors by name."""
    dtype = bases[0].dtype
    names = ["y", "skip"] + [n for n, p in zip(PARAM_NAMES, params) if p is not None]
    leaves = [t.detach().clone().requires_grad_(grads) for t in bases + [p for p in params if p is not None]]
    it = iter(leaves[2:])
    y, skip = view(*leaves[:2])
    used = [next(it) if p is not None else None for p in params]
    out = post_attention(y, skip, *used, eps=eps, backend=None if backend == "auto" else backend)
    assert out.dtype == dtype and out.shape == skip.shape, (out.dtype, out.shape)
    # the docstring promises a contiguous result; eager keeps skip's layout (test_eager_result_is_contiguous)
    assert out.is_contiguous() or backend == "eager", (backend, out.stride())
    leaves64 = [t.detach().double().requires_grad_(grads) for t in leaves]
    it = iter(leaves64[2:])
    # the truth on one thread: in about one process in 15, the first multithreaded float64 evaluation of the formula
    # came out ~1e-12 off in one thread's half of the rows (and right when recomputed in the same process)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = post_attention_formula(*view(*leaves64[:2]), *(next(it) if p is not None else None for p in params),
                                          eps)
    finally:
        torch.set_num_threads(threads)
    out_tol, grad_tol = tolerances(dtype)
    errors = {"out": relative_error(out, expected.detach())}
    assert_close_to(out.detach(), expected.detach(), out_tol, f"{backend} {dtype_name(dtype)} out")
    if not grads:
        return errors
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(expected, leaves64, grad_out.double())
    for name, leaf, g, w in zip(names, leaves, got, want):
        assert g.dtype == dtype and g.shape == leaf.shape, (name, g.dtype, g.shape)
        errors[name] = relative_error(g, w)
        assert_close_to(g, w, grad_tol, f"{backend} {dtype_name(dtype)} grad of {name}")
    return errors


# --- values and gradients against float64 ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_matches_float64_reference(backend, dtype, shape):
    skip_unless_available(backend, dtype)
    lead, D, E, H = shape
    check_against_float64(backend, *make_input("contiguous", lead, D, E, dtype), make_params(D, E, H, dtype))


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=shape_id)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)
def test_low_precision_auto_matches_float64(dtype, shape):
    """fp16/bf16 have no kernel: auto runs eager torch, within the low-precision bounds."""
    assert BACKENDS.resolve(None, torch.empty(1, dtype=dtype)) == "eager"
    lead, D, E, H = shape
    check_against_float64("auto", *make_input("contiguous", lead, D, E, dtype), make_params(D, E, H, dtype))


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "contiguous"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_layouts_match_float64(backend, dtype, layout):
    """Column slices, transposed y/skip (stride(-1) != 1), leading dims no view flattens, row strides, a stride-0
    broadcast: the same values and gradients (landing in the bases) as the formula. 3 x 45 rows: three tasks; the
    wide path (H = 7000) reads y and skip through ATen's GEMM and its own passes, with their own strides."""
    skip_unless_available(backend, dtype)
    for lead, H in (((3, 45), 40), ((2, 3, 7), 40), ((3, 45), 7000)):
        check_against_float64(backend, *make_input(layout, lead, 24, 20, dtype), make_params(24, 20, H, dtype))


@pytest.mark.parametrize("missing", [(name,) for name in OPTIONAL] + [OPTIONAL],
                         ids=[f"no_{name}" for name in OPTIONAL] + ["all_none"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_none_parameters_match_float64(backend, dtype, missing):
    skip_unless_available(backend, dtype)
    for lead, D, E, H in (((2, 40), 64, 64, 64), ((7,), 5, 7, 11)):
        check_against_float64(backend, *make_input("contiguous", lead, D, E, dtype),
                              make_params(D, E, H, dtype, missing))


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_narrow_norm_matches_float64(backend, dtype):
    """E = 2 and E = 1 (the kernel's scalar tails only). The LayerNorm multiplies the rounding of x - mean by
    rstd = (var + eps)^-1/2, up to eps^-1/2 = 316 for rows whose variance is far below eps (random pairs come that
    close in a few hundred rows), and its gradient by the square of that: the 128u bounds hold for rows whose
    variance is not tiny. E = 2: rows spread by +-2 (variance >= ~1). E = 1: the variance is always 0, so eps = 1
    (rstd = 1); at eps = 1e-5 torch's layer_norm backward (which the op's backward runs) forms x rstd - mean rstd,
    ~316u |x| instead of 0, and the parameter gradients sum that over the rows (measured up to 2.5e3u fp32)."""
    skip_unless_available(backend, dtype)
    bases, view = make_input("kqv_slice", (65,), 3, 2, dtype)
    bases[1] = bases[1] * 0.25 + torch.tensor([-2.0, 2.0] * 3, dtype=dtype)
    check_against_float64(backend, bases, view, make_params(3, 2, 5, dtype))
    for lead, D, H in (((10,), 1, 1), ((2, 65), 3, 2)):
        check_against_float64(backend, *make_input("contiguous", lead, D, 1, dtype), make_params(D, 1, H, dtype),
                              eps=1.0)


@pytest.mark.parametrize("case", ["variance_below_eps", "mean_100x_spread"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_near_constant_rows(backend, dtype, case):
    """Ill-conditioned norms: rows of x whose variance (1e-8) is far below eps, and rows whose mean is 100x their
    spread. The norm scales x - mean by rstd (up to eps^-1/2 = 316), and with it the few u of rounding x carries
    relative to |x| (its D-term sum and the skip add). First order: |error| <~ c u kappa with kappa = max over rows of
    rstd |x|_max (~3 for the random rows elsewhere, here ~316 and ~85); bound 16u kappa, measured <= 1.6u kappa. The
    gradients of such rows are ill-conditioned as kappa^2 in any precision; both backends run the same eager chain
    for them (the cpp backward recomputes it): cpp's are within 128u of eager's."""
    skip_unless_available(backend, dtype)
    if case == "variance_below_eps":
        y, skip = (1e-4 * torch.randn(200, 16)).to(dtype), (1 + 1e-4 * torch.randn(200, 24)).to(dtype)
    else:
        y, skip = torch.randn(200, 16).to(dtype), (100 + torch.randn(200, 24)).to(dtype)
    params = make_params(16, 24, 32, dtype, missing=("proj_bias",))
    x = skip.double() + y.double() @ params[0].double().T
    rstd = (x.var(-1, correction=0, keepdim=True) + 1e-5).rsqrt()
    kappa = (rstd * x.abs().amax(-1, keepdim=True)).max().item()
    assert kappa > 50
    leaves = [t.clone().requires_grad_() for t in [y, skip] + [p for p in params if p is not None]]
    got = [post_attention(*leaves[:2], leaves[2], None, *leaves[3:], backend=b) for b in (backend, "eager")]
    want = post_attention_formula(y.double(), skip.double(), params[0].double(), None,
                                  *(p.double() for p in params[2:]), 1e-5)
    assert_close_to(got[0].detach(), want, 16 * UNIT_ROUNDOFF[dtype] * kappa, f"{backend} out")
    grad_out = torch.randn_like(got[0])
    for name, g, e in zip(["y", "skip"] + [n for n in PARAM_NAMES if n != "proj_bias"],
                          torch.autograd.grad(got[0], leaves, grad_out), torch.autograd.grad(got[1], leaves, grad_out)):
        assert_close_to(g, e.double(), TOLERANCES[dtype], f"{backend} grad of {name} against eager's")


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_none_is_zeros_and_ones(backend):
    """A missing bias is zeros and a missing norm weight ones: bitwise the same output, and for cpp (whose wrapper
    passes zeros and ones to the op, and whose backward recomputes with them) the same grad of y. (Eager's gradients
    differ in the last bits: F.linear without a bias takes another GEMM path than with a zero one.)"""
    skip_unless_available(backend)
    y0, skip = torch.randn(70, 12), torch.randn(70, 10)
    params = make_params(12, 10, 20, torch.float32)
    filled = [torch.ones(10) if n == "norm_weight" else torch.zeros_like(p) if n in OPTIONAL else p
              for n, p in zip(PARAM_NAMES, params)]
    results = []
    for ps in ([None if n in OPTIONAL else p for n, p in zip(PARAM_NAMES, params)], filled):
        y = y0.clone().requires_grad_()
        out = post_attention(y, skip, *ps, backend=backend)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).cos())
        results.append((out, y.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert backend == "eager" or torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_eps_matches_float64(backend, eps):
    """eps is added to the variance inside the square root, as in F.layer_norm (0 is allowed)."""
    for dtype in DTYPES[backend][:2]:
        skip_unless_available(backend, dtype)
        check_against_float64(backend, *make_input("kqv_slice", (2, 40), 16, 24, dtype),
                              make_params(16, 24, 48, dtype), eps=eps)


def test_reference_is_the_post_attention_formula():
    """reference.py (the eager backend: F.linear, F.layer_norm, F.gelu) equals the written-out formula the tests
    compare with, in float64, output and gradients."""
    inputs = [torch.randn(3, 5, 9, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64),
              *make_params(9, 6, 13, torch.float64)]
    inputs = [t.requires_grad_() for t in inputs]
    got = reference.post_attention(*inputs, 1e-5)
    want = post_attention_formula(*inputs, 1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    grad_out = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-13 * e.abs().max().item())


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_empty_rows(backend):
    """M = 0 rows (in any leading dim): an empty output of skip's shape, zero parameter gradients."""
    skip_unless_available(backend)
    for lead in ((0,), (2, 0), (0, 3)):
        y = torch.randn(*lead, 8, requires_grad=True)
        skip = torch.randn(*lead, 6, requires_grad=True)
        params = [p.requires_grad_() for p in make_params(8, 6, 16, torch.float32)]
        out = post_attention(y, skip, *params, backend=backend)
        assert out.shape == (*lead, 6) and out.dtype == torch.float32
        grads = torch.autograd.grad(out, [y, skip, *params], torch.ones_like(out))
        assert grads[0].shape == y.shape and grads[1].shape == skip.shape
        for p, g in zip(params, grads[2:]):
            assert torch.equal(g, torch.zeros_like(p))


def test_compiled_op_empty_and_zero_widths():
    """The C++ op itself (the wrapper sends empty y or skip to eager): M = 0 and E = 0 give empty outputs, D = 0
    (x = skip + proj_bias) and H = 0 (no MLP: out = x + fc2_bias) match the formula."""
    skip_unless_available("cpp")
    op = torch.ops.t2t_kernels.post_attention
    for M, D, E, H in ((0, 5, 8, 6), (4, 5, 0, 6), (70, 0, 8, 6), (70, 5, 8, 0)):
        y, skip = torch.randn(M, D), torch.randn(M, E)
        params = make_params(D, E, H, torch.float32)
        out = op(y, skip, *params, 1e-5)
        assert out.shape == (M, E)
        want = post_attention_formula(y.double(), skip.double(), *(p.double() for p in params), 1e-5)
        assert_close_to(out, want, TOLERANCES[torch.float32], f"M={M} D={D} E={E} H={H}")


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_inference_mode(backend):
    skip_unless_available(backend)
    y, skip = torch.randn(2, 50, 16), torch.randn(2, 50, 8)
    params = make_params(16, 8, 32, torch.float32)
    with torch.inference_mode():
        out = post_attention(y, skip, *params, backend=backend)
    want = post_attention_formula(y.double(), skip.double(), *(p.double() for p in params), 1e-5)
    assert_close_to(out, want, TOLERANCES[torch.float32], "out")


# --- backend choice ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES["eager"], ids=dtype_name)
def test_auto_backend(dtype):
    """auto: cpp for fp32/fp64 CPU tensors (when built), eager otherwise; the same result as naming it."""
    y, skip = torch.randn(5, 7).to(dtype), torch.randn(5, 6).to(dtype)
    available = BACKENDS.unavailable_reason("cpp", y.device, dtype) is None
    expected = "cpp" if available else "eager"
    assert dtype in DTYPES["cpp"] or expected == "eager"
    assert BACKENDS.resolve(None, y) == expected and BACKENDS.resolve("auto", y) == expected
    params = make_params(7, 6, 9, dtype)
    assert torch.equal(post_attention(y, skip, *params), post_attention(y, skip, *params, backend=expected))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)
def test_cpp_rejects_low_precision(dtype):
    y, skip = torch.randn(5, 7).to(dtype), torch.randn(5, 6).to(dtype)
    with pytest.raises(RuntimeError, match=r"backend='cpp' is not available: dtype .* not supported by backend 'cpp'"):
        post_attention(y, skip, *make_params(7, 6, 9, dtype), backend="cpp")


# --- autograd: gradcheck, double backward ---------------------------------------------------------------------------


def small_float64_inputs(layout="kqv_slice"):
    bases, view = make_input(layout, (3,), 3, 4, torch.float64)
    params = make_params(3, 4, 5, torch.float64)
    return tuple(t.requires_grad_() for t in bases + params), view


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_gradcheck_float64(backend):
    skip_unless_available(backend, torch.float64)
    inputs, view = small_float64_inputs()

    def fn(y, kqv, *params):
        return post_attention(*view(y, kqv), *params, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_gradgradcheck_float64(backend):
    """Double backward: the cpp op's backward differentiates the eager chain with create_graph."""
    skip_unless_available(backend, torch.float64)
    inputs, view = small_float64_inputs("y_transposed")

    def fn(y, skip, *params):
        return post_attention(*view(y, skip), *params, backend=backend)

    assert torch.autograd.gradgradcheck(fn, inputs)


# --- opcheck, torch.compile -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "kqv_slice"])
def test_opcheck(layout):
    """The registered op (as the wrapper calls it: 2-D y and skip with unit last stride, every parameter given)."""
    skip_unless_available("cpp")
    bases, view = make_input(layout, (9,), 6, 8, torch.float32)
    y, skip = view(*(t.requires_grad_() for t in bases))
    params = make_params(6, 8, 12, torch.float32)
    args = (y, skip, *(p.requires_grad_() for p in params), 1e-5)
    torch.library.opcheck(torch.ops.t2t_kernels.post_attention, args)


def test_compile_fullgraph_cpp():
    """torch.compile(fullgraph=True) through the kqv slice and the op: no graph break, the op in the generated code
    (not the eager chain), the same values and gradients. One small shape: compiling is slow on two cores."""
    skip_unless_available("cpp")
    from torch._inductor.utils import run_and_get_code

    E = 8

    def layer_tail(y, kqv, *params):
        return post_attention(y, kqv[..., 2 * E:], *params, backend="cpp").sin()

    inputs = [torch.randn(2, 5, 6), torch.randn(2, 5, 3 * E), *make_params(6, E, 12, torch.float32)]
    args = [t.clone().requires_grad_() for t in inputs]
    expected_args = [t.clone().requires_grad_() for t in inputs]
    compiled = torch.compile(layer_tail, fullgraph=True)
    got, (code, *_) = run_and_get_code(compiled, *args)
    assert "torch.ops.t2t_kernels.post_attention.default(" in code, code
    want = layer_tail(*expected_args)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    for a, e in zip(args, expected_args):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.parametrize("dtype", DTYPES["cpp"], ids=dtype_name)
@pytest.mark.parametrize("onednn", ["on", "env-off", "torch-off"])
def test_wide_layers_run_whole_matrix_products(dtype, onednn, monkeypatch):
    """Above WIDE_WEIGHT_BYTES the kernel runs its three products as whole-matrix GEMMs over all rows (they beat its
    unpacked tiles once the weights leave the cache): oneDNN's fused linear for float32 where torch has it (unless
    T2T_ONEDNN=0 or torch.backends.mkldnn.enabled is False), else ATen's mm (MKL); below, neither. Both sides of
    the bound in the same shape family, each checked against the formula, on both wide paths."""
    skip_unless_available("cpp", dtype)
    monkeypatch.setenv(ONEDNN_ENV, "0" if onednn == "env-off" else "1")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn != "torch-off")
    on_onednn = onednn_linear_applies(torch.empty((1, 1), dtype=dtype))
    assert on_onednn == (dtype == torch.float32 and onednn == "on" and ONEDNN_LINEAR_REGISTERED
                         and torch.backends.mkldnn.is_available())
    product = "mkldnn::_linear_pointwise" if on_onednn else "aten::mm"
    itemsize = torch.empty((), dtype=dtype).element_size()
    for H, wide in ((40, False), (7000, True)):
        D, E = 24, 20
        assert ((D * E + 2 * E * H) * itemsize > WIDE_WEIGHT_BYTES) == wide
        bases, view = make_input("contiguous", (70,), D, E, dtype)
        params = make_params(D, E, H, dtype)
        with torch.profiler.profile() as prof:
            out = post_attention(*view(*bases), *params, backend="cpp")
        keys = [event.key for event in prof.events()]
        counts = {key: keys.count(key) for key in ("aten::mm", "mkldnn::_linear_pointwise")}
        assert counts == {key: 3 if wide and key == product else 0 for key in counts}, (H, counts)
        want = post_attention_formula(*view(*(b.double() for b in bases)), *(p.double() for p in params), 1e-5)
        assert_close_to(out, want, TOLERANCES[dtype], f"H={H}")


# --- determinism --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES["cpp"], ids=dtype_name)
def test_cpp_deterministic_across_threads(dtype):
    """Bitwise the same output with 1 and with 2 threads, two runs each (300 rows: five 64-row tasks, split between
    the threads), and the same gradients in runs with the same thread count. (The gradients are torch's eager chain,
    whose sums over the rows are split by thread, so they may differ in the last bits between thread counts.)
    The thread count is restored. Wide layers (test_wide_layers_run_whole_matrix_products) are exempt: their products
    are ATen's, whose bits may change with the thread count as eager's do (MKL splits some shapes differently)."""
    skip_unless_available("cpp", dtype)
    bases, view = make_input("kqv_slice", (3, 100), 64, 64, dtype)
    params = make_params(64, 64, 64, dtype)
    threads = torch.get_num_threads()
    results = []
    for num_threads in (1, 2, 2, 1):
        torch.set_num_threads(num_threads)
        try:
            leaves = [t.clone().requires_grad_() for t in bases + params]
            out = post_attention(*view(*leaves[:2]), *leaves[2:], backend="cpp")
            grads = torch.autograd.grad(out, leaves, torch.arange(out.numel(), dtype=dtype).view(out.shape).sin())
        finally:
            torch.set_num_threads(threads)
        results.append((out, *grads))
    assert torch.get_num_threads() == threads
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0])
    for first, second in ((results[0], results[3]), (results[1], results[2])):
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_eager_result_is_contiguous():
    bases, view = make_input("both_transposed", (3, 45), 24, 20, torch.float32)
    out = post_attention(*view(*bases), *make_params(24, 20, 40, torch.float32), backend="eager")
    assert out.is_contiguous(), out.stride()


# --- extreme values ---------------------------------------------------------------------------------------------------


def gelu_through_the_op(values, backend):
    """gelu(values) read back through the op: y = skip = 0 make x = 0 (so the norm's output is 0), fc1's weight is 0
    and its bias the values, fc2 the identity; every step after the GELU adds zeros or multiplies by 1, exactly."""
    n, dtype = values.numel(), values.dtype
    assert (3 * n + 2 * n * n) * values.element_size() <= WIDE_WEIGHT_BYTES  # the row-block path
    y, skip = torch.zeros(2, 3, dtype=dtype), torch.zeros(2, n, dtype=dtype)
    out = post_attention(y, skip, torch.zeros(n, 3, dtype=dtype), None, None, None, torch.zeros(n, n, dtype=dtype),
                         values, torch.eye(n, dtype=dtype), None, backend=backend)
    assert torch.equal(out[0], out[1])
    return out[0]


@pytest.mark.parametrize("dtype", DTYPES["cpp"], ids=dtype_name)
def test_gelu_tails_cpp(dtype):
    """The kernel's GELU, elementwise relative error against float64 over [-10, 10] (gelu(-10) ~ -7.6e-23).
    fp32: x/2 erfc(-x/sqrt(2)) with Numerical Recipes' erfc fit (relative error < 1.2e-7 in exact arithmetic) on the
    kernel's exp. Rounding adds a few u in the fit's polynomial (its terms, up to 1.5, cancel to ~0 near x = 0) and
    in the exp, and the exponent -x^2/2 carries the rounding of -x/sqrt(2) and of its square: ~2.5u x^2 absolute,
    as much relative in the result. Bound 1.2e-7 + (16 + 3 x^2) u; measured (200001 points, AVX-512) <= 8.7u for
    |x| < 2 and 118u at x = -9.9, at most 0.48 of the bound. fp64: std::erfc per lane, measured <= 3.7u: bound 16u.
    (torch's own F.gelu, the eager backend, forms 1 + erf(x/sqrt(2)), which cancels to 0 in the left tail: relative
    error 1 at x = -10, harmless in absolute terms.)"""
    skip_unless_available("cpp", dtype)
    u = UNIT_ROUNDOFF[dtype]
    x = torch.linspace(-10, 10, 4096, dtype=torch.float64).to(dtype)
    # and the far ends, where the fit's reciprocal and exponent must saturate: gelu(x) = x to the right, 0 to the left
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-30, -1e-30, -1e-3, 1e-3, 1e20, -1e20, 3e38, -3e38], dtype=dtype)])
    # chunks of 128: fc1's 128x128 weight keeps the op below WIDE_WEIGHT_BYTES, on the kernel's own GELU (the wide
    # float32 path's is oneDNN's, which like torch's F.gelu is accurate in absolute terms only: 0 below x ~ -5.5)
    got = torch.cat([gelu_through_the_op(chunk, "cpp") for chunk in x.split(128)]).double()
    x64 = x.double()
    want = gelu(x64)
    bound = (1.2e-7 + (16 + 3 * x64 * x64) * u) if dtype == torch.float32 else torch.full_like(x64, 16 * u)
    rel = (got - want).abs() / want.abs().clamp_min(1e-300)
    rel = torch.where(want == 0, (got != 0).double(), rel)  # gelu(0) = 0 exactly
    worst = (rel / bound).nan_to_num(nan=float("inf")).argmax()
    assert (rel <= bound).all(), (
        f"gelu({x64[worst].item():g}) = {got[worst].item():.9g}, float64 {want[worst].item():.9g}: relative error "
        f"{rel[worst].item():.3g} > bound {bound[worst].item():.3g}")
    assert got.isfinite().all() and (got[x64 < 0] <= 0).all() and (got[x64 > 0] > 0).all()


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_gelu_both_tails_in_the_chain_match_float64(backend, dtype):
    """fc1's outputs spread over -10..+10 (fc1's weight scaled by 4): both tails of the GELU inside the whole chain
    with gradients, within the usual bounds."""
    skip_unless_available(backend, dtype)
    bases, view = make_input("kqv_slice", (2, 30), 16, 16, dtype)
    params = make_params(16, 16, 48, dtype)
    params[4] = params[4] * 4  # fc1's outputs: std ~ 2.6 around biases spread over -4..4
    params[5] = torch.linspace(-4, 4, 48).to(dtype)
    y, skip = view(*bases)
    with torch.no_grad():
        x = skip + y @ params[0].T + params[1]
        a = torch.nn.functional.layer_norm(x, (16,), params[2], params[3]) @ params[4].T + params[5]
    assert a.min() < -8 and a.max() > 8, (a.min(), a.max())
    check_against_float64(backend, bases, view, params)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_large_inputs_match_float64(backend, dtype):
    """y scaled by 1e3 (x ~ 1e3: the norm's statistics must not lose it), and x ~ 1e15 with fc2 scaled alike so the
    MLP's part is not lost under x in the error's normalisation (x^2 ~ 1e30 still fits in fp32)."""
    skip_unless_available(backend, dtype)
    bases, view = make_input("kqv_slice", (2, 40), 32, 32, dtype)
    bases[0] = bases[0] * 1e3
    check_against_float64(backend, bases, view, make_params(32, 32, 64, dtype))
    bases, view = make_input("contiguous", (2, 40), 32, 32, dtype, scale=1e15)
    params = make_params(32, 32, 64, dtype)
    params[6], params[7] = params[6] * 1e15, params[7] * 1e15
    check_against_float64(backend, bases, view, params, grads=False)


@pytest.mark.parametrize("where", ["y", "skip"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.float64)))
def test_nan_stays_in_its_row(backend, dtype, where):
    """A NaN in one row of y (or skip) makes that row of the output all NaN and leaves every other row as without it
    (bitwise for cpp: rows are independent). Rows 5 (first task), 64 (first row of the second) and 129 (the last,
    alone in its task)."""
    skip_unless_available(backend, dtype)
    y, skip = torch.randn(130, 16).to(dtype), torch.randn(130, 12).to(dtype)
    params = make_params(16, 12, 24, dtype)
    clean = post_attention(y, skip, *params, backend=backend)
    rows = [5, 64, 129]
    poisoned = (y.clone(), skip.clone())
    poisoned[0 if where == "y" else 1][rows, 3] = float("nan")
    out = post_attention(*poisoned, *params, backend=backend)
    assert out[rows].isnan().all()
    others = torch.ones(130, dtype=torch.bool)
    others[rows] = False
    if backend == "cpp":
        assert torch.equal(out[others], clean[others])
    else:
        torch.testing.assert_close(out[others], clean[others], rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype])


# --- bad input -------------------------------------------------------------------------------------------------------

D0, E0, H0 = 6, 8, 12


def bad_args(**changes):
    """Valid arguments (y (2, 3, D0), skip (2, 3, E0)) with some replaced."""
    args = dict(y=torch.randn(2, 3, D0), skip=torch.randn(2, 3, E0),
                **dict(zip(PARAM_NAMES, make_params(D0, E0, H0, torch.float32))))
    args.update(changes)
    return args


WRONG_SHAPES = {
    "proj_weight": (E0, D0 + 1), "proj_bias": (E0 + 1,), "norm_weight": (E0, 1), "norm_bias": (E0 - 1,),
    "fc1_bias": (H0 + 1,), "fc2_weight": (E0, H0 - 1), "fc2_bias": (1, E0),
}
BAD_INPUTS = [
    *[pytest.param(bad_args(**{name: torch.randn(shape)}), ValueError,
                   rf"{name} must have shape .* got {tuple(shape)}".replace("(", r"\(").replace(")", r"\)"),
                   id=f"{name}-shape") for name, shape in WRONG_SHAPES.items()],
    # fc1_weight sets H: a wrong E in it names it with the shapes
    pytest.param(bad_args(fc1_weight=torch.randn(H0, E0 + 1)), ValueError,
                 r"fc1_weight must have shape \(12, 8\) .* got \(12, 9\)", id="fc1_weight-shape"),
    pytest.param(bad_args(fc1_weight=torch.randn(H0)), ValueError,
                 r"fc1_weight must be a 2-D Tensor \(H, E\), got \(12,\)",
                 id="fc1_weight-1d"),
    pytest.param(bad_args(proj_weight=torch.randn(E0 * D0)), ValueError, r"proj_weight must be a 2-D Tensor \(E, D\)",
                 id="proj_weight-1d"),
    pytest.param(bad_args(skip=torch.randn(3, 2, E0)), ValueError,
                 r"must share their leading dims, got y \(2, 3, 6\) and skip \(3, 2, 8\)", id="lead-differs"),
    pytest.param(bad_args(skip=torch.randn(6, E0)), ValueError, "must share their leading dims", id="lead-dims-count"),
    pytest.param(bad_args(y=torch.tensor(1.0)), ValueError, "must share their leading dims", id="y-0d"),
    pytest.param(bad_args(fc1_weight=torch.randn(H0, E0, dtype=torch.float64)), TypeError,
                 "all tensors must share one dtype, got y torch.float32, .*fc1_weight torch.float64", id="dtype-mismatch"),
    pytest.param(bad_args(skip=torch.randn(2, 3, E0, dtype=torch.float64)), TypeError, "share one dtype",
                 id="skip-dtype"),
    pytest.param(bad_args(y=torch.ones(2, 3, D0, dtype=torch.int64)), TypeError,
                 "y must be a floating-point Tensor, got torch.int64", id="y-int"),
    pytest.param(bad_args(y=[[0.0] * D0]), TypeError, "y must be a floating-point Tensor, got list", id="y-list"),
    pytest.param(bad_args(skip=None), TypeError, "skip must be a floating-point Tensor, got NoneType", id="skip-none"),
    pytest.param(bad_args(fc2_weight=None), TypeError, "fc2_weight must be a Tensor, got NoneType", id="fc2-none"),
    pytest.param(bad_args(proj_weight=[[0.0] * D0] * E0), ValueError, "proj_weight must be a 2-D Tensor .* got list",
                 id="proj_weight-list"),
    pytest.param(bad_args(proj_bias=[0.0] * E0), TypeError, "proj_bias must be a Tensor or None, got list",
                 id="proj_bias-list"),
    pytest.param(bad_args(norm_weight=torch.ones(E0, device="meta")), ValueError,
                 "all tensors must be on one device, got .*norm_weight on meta", id="device-mismatch"),
    pytest.param(bad_args(eps=-1e-5), ValueError, "eps must be a non-negative finite number, got -1e-05",
                 id="eps-negative"),
    pytest.param(bad_args(eps=float("nan")), ValueError, "eps must be a non-negative finite number, got nan",
                 id="eps-nan"),
    pytest.param(bad_args(eps=float("inf")), ValueError, "eps must be a non-negative finite number, got inf",
                 id="eps-inf"),
    pytest.param(bad_args(eps=True), ValueError, "eps must be a non-negative finite number, got True", id="eps-bool"),
    pytest.param(bad_args(eps="1e-5"), ValueError, "eps must be a non-negative finite number", id="eps-str"),
]


@pytest.mark.parametrize("args,error,match", BAD_INPUTS)
@pytest.mark.parametrize("backend", [None, "eager", "cpp"])
def test_bad_input(args, error, match, backend):
    with pytest.raises(error, match=match):
        post_attention(**args, backend=backend)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        post_attention(**bad_args(), backend="fast")
    with pytest.raises(RuntimeError, match="post_attention has no triton kernel"):
        post_attention(**bad_args(), backend="triton")
    if BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32) is None:
        meta = {k: v.to("meta") for k, v in bad_args().items()}
        with pytest.raises(RuntimeError, match="backend 'cpp' runs on cpu tensors, got a meta tensor"):
            post_attention(**meta, backend="cpp")


def test_compiled_op_rejects_bad_input():
    """The C++ op checks its arguments itself (it can be called without the Python wrapper)."""
    skip_unless_available("cpp")
    op = torch.ops.t2t_kernels.post_attention
    y, skip = torch.randn(6, D0), torch.randn(6, E0)
    params = make_params(D0, E0, H0, torch.float32)
    assert op(y, skip, *params, 1e-5).shape == (6, E0)
    with pytest.raises(RuntimeError, match=r"y must be \(M, D\) and skip \(M, E\), got y \[2, 3, 6\]"):
        op(y.view(2, 3, D0), skip, *params, 1e-5)
    with pytest.raises(RuntimeError, match=r"y must be \(M, D\) and skip \(M, E\)"):
        op(y, skip[:5], *params, 1e-5)
    for i, name in enumerate(PARAM_NAMES):
        wrong = list(params)
        wrong[i] = params[i][..., :-1]
        with pytest.raises(RuntimeError, match=f"{name} must have shape"):
            op(y, skip, *wrong, 1e-5)
    with pytest.raises(RuntimeError, match="y must be float32 or float64, got BFloat16"):
        op(y.bfloat16(), skip.bfloat16(), *(p.bfloat16() for p in params), 1e-5)
    with pytest.raises(RuntimeError, match="all tensors must have y's dtype Float, got Double"):
        op(y, skip, *params[:4], params[4].double(), *params[5:], 1e-5)
    with pytest.raises(RuntimeError, match="eps must be non-negative"):
        op(y, skip, *params, -1.0)
