"""soft_split against F.unfold (forward) and F.fold (backward), for every backend that can run here.

Triton runs on CPU tensors through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), so
shapes stay small; the CUDA tests at model shapes skip without a GPU. Every torch.empty is NaN-filled
(tests/conftest.py), so an output element a kernel forgets to write fails the comparison.
"""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from op_params import backend_dtype_params
from soft_split_layouts import (
    LAYOUTS, PADDING_BEYOND_KERNEL, SHAPES, STAGE_IDS, STAGES, assert_compiles_like_eager, make_input, padding_case_id,
    shape_id,
)
from virtual_views import image_past_int32
from t2t_kernels.ops import soft_split
from t2t_kernels.ops.soft_split import BACKENDS, grad_is_channels_last

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Forward is a pure gather: every backend equals F.unfold exactly, in every dtype. Backward sums <= ceil(k/s)^2
# windows per pixel: fp32/fp64 equal F.fold exactly on CPU (same summation order as ATen's CPU col2im); fp16/bf16 (one
# rounding of an fp32 sum in ours, a bf16/fp16 sum in eager) against float64 within (rtol, atol * max|grad|). On a GPU
# ATen's col2im sums a pixel's windows in its own order (on an H100 the fp32 gradients of 56 cases were not bitwise
# CUDA F.fold's; against float64 at torch.testing's fp32 tolerance they passed), so fp32 there is checked that way.
GPU_FLOAT32_BACKWARD_TOLERANCE = (1.3e-6, 1e-5)
BACKWARD_TOLERANCES = {
    torch.float64: (0.0, 0.0),
    torch.float32: (0.0, 0.0),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = {
    "eager": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def skip_unless_available(backend, dtype=torch.float32, device="cpu"):
    reason = BACKENDS.unavailable_reason(backend, torch.device(device), dtype)
    if reason:
        pytest.skip(reason)




def unfold_reference(x, k, s, p):
    return F.unfold(x, k, padding=p, stride=s).transpose(1, 2).contiguous()


def fold_reference(grad_out, input_hw, k, s, p):
    return F.fold(grad_out.transpose(1, 2), input_hw, k, padding=p, stride=s)


def backward_tolerance(dtype, on_gpu):
    return GPU_FLOAT32_BACKWARD_TOLERANCE if on_gpu and dtype == torch.float32 else BACKWARD_TOLERANCES[dtype]


def assert_backward_close(actual, expected, dtype):
    rtol, atol = backward_tolerance(dtype, actual.is_cuda)
    if rtol == 0 and atol == 0:
        assert torch.equal(actual, expected)
        return
    scale = expected.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def check_forward_backward(backend, leaf, view, k, s, p):
    """soft_split(view(leaf)) == F.unfold exactly; leaf's gradient through the view == eager unfold's (F.fold), in
    the same dtype for fp32/fp64 (exactly; fp32 on a GPU: in float64), in float64 for fp16/bf16 (within their tolerance)."""
    dtype = leaf.dtype
    leaf = leaf.detach().requires_grad_()
    x = view(leaf)
    out = soft_split(x, k, s, p, backend=backend)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, unfold_reference(x.detach(), k, s, p))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_dtype = dtype if backward_tolerance(dtype, leaf.is_cuda) == (0.0, 0.0) else torch.float64
    leaf_ref = leaf.detach().to(ref_dtype).requires_grad_()
    unfold_reference(view(leaf_ref), k, s, p).backward(grad_out.to(ref_dtype))
    assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
    assert_backward_close(leaf.grad, leaf_ref.grad, dtype)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_offsets_past_int32(backend):
    """x as a view into a 4.3 GB virtual storage whose last image's offsets pass 2^31 (tests/virtual_views.py), as
    in batches of more than 2^31 elements."""
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    skip_unless_available(backend, dtype)
    check_forward_backward(backend, image_past_int32(dtype), lambda t: t, 3, 2, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(DTYPES))
def test_matches_unfold_and_fold(backend, dtype, shape, layout):
    skip_unless_available(backend, dtype)
    B, C, H, W, k, s, p = shape
    check_forward_backward(backend, *make_input(B, C, H, W, layout, dtype), k, s, p)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
@pytest.mark.parametrize("kernel_size", [3, 4, 7])
def test_every_padding(backend, kernel_size):
    """padding 0 .. k-1 (the windows that are mostly padding at the edges), with strides below, at and above k."""
    skip_unless_available(backend)
    strides = (1, 2, kernel_size + 1)
    for p in range(kernel_size):
        for layout, s in (("contiguous", strides[p % 3]), ("token_view", strides[(p + 1) % 3])):
            check_forward_backward(backend, *make_input(2, 3, 9, 10, layout), kernel_size, s, p)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
@pytest.mark.parametrize("case", PADDING_BEYOND_KERNEL, ids=padding_case_id)
def test_padding_beyond_kernel(backend, case):
    """padding >= kernel_size: whole windows (rows, columns) lie in the padding, on every side."""
    skip_unless_available(backend)
    H, W, k, s, p = case
    for layout in ("contiguous", "token_view"):
        check_forward_backward(backend, *make_input(2, 3, H, W, layout), k, s, p)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_token_view_gradient_is_contiguous_tokens(backend):
    """The token view's gradient comes back as contiguous (B, N, C) tokens (channels_last grad_x), not a transposed
    copy; a contiguous image gets a contiguous gradient."""
    skip_unless_available(backend)
    tokens, view = make_input(2, 6, 8, 8, "token_view")
    tokens.requires_grad_()
    x = view(tokens)
    assert grad_is_channels_last(x)
    soft_split(x, 3, 2, 1, backend=backend).sum().backward()
    assert tokens.grad.is_contiguous()
    image = torch.randn(2, 6, 8, 8, requires_grad=True)
    assert not grad_is_channels_last(image)
    soft_split(image, 3, 2, 1, backend=backend).sum().backward()
    assert image.grad.is_contiguous()


def test_auto_on_cuda_prefers_the_cuda_kernel_then_triton(monkeypatch):
    """On an H100 the CUDA soft split ran 1.3-1.8x faster than the Triton one at every T2T-ViT split (BENCHMARKS.md)."""
    available = {"cuda", "triton", "eager"}
    monkeypatch.setattr(type(BACKENDS), "unavailable_reason",
                        lambda self, b, device, dtype: None if b in available else "no")
    x = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert BACKENDS.resolve("auto", x) == "cuda"
    available.discard("cuda")  # an extension built without CUDA kernels
    assert BACKENDS.resolve("auto", x) == "triton"


def test_auto_picks_cpp_on_cpu():
    x = torch.randn(1, 2, 5, 5)
    expected = "cpp" if BACKENDS.unavailable_reason("cpp", x.device, x.dtype) is None else "eager"
    assert BACKENDS.resolve(None, x) == expected
    assert BACKENDS.resolve("auto", x) == expected


def test_eager_ops_switch_makes_auto_run_the_eager_formula(monkeypatch):
    """T2T_EAGER_OPS names the ops whose "auto" runs the eager formula (A/B timing, letting inductor generate them);
    an explicit backend is unaffected, and a misspelt op name is an error that names the switch."""
    x = torch.randn(1, 2, 5, 5)
    auto = BACKENDS.resolve("auto", x)
    monkeypatch.setenv("T2T_EAGER_OPS", "performer_attention")
    assert BACKENDS.resolve("auto", x) == auto
    for value in ("soft_split", " performer_attention, soft_split ", "all"):
        monkeypatch.setenv("T2T_EAGER_OPS", value)
        assert BACKENDS.resolve("auto", x) == "eager"
        assert BACKENDS.resolve(None, x) == "eager"
        assert BACKENDS.resolve("triton" if auto == "eager" else auto, x) != "eager"
    monkeypatch.setenv("T2T_EAGER_OPS", "soft_split,softsplit")
    with pytest.raises(ValueError, match=r"T2T_EAGER_OPS: unknown op name\(s\) 'softsplit'"):
        BACKENDS.resolve("auto", x)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("layout", ["contiguous", "token_view"])
def test_gradcheck_float64(backend, layout):
    skip_unless_available(backend, torch.float64)
    leaf, view = make_input(2, 3, 7, 6, layout, torch.float64)  # B, C, H, W
    leaf.requires_grad_()

    def fn(leaf):
        return soft_split(view(leaf), (3, 2), (2, 1), (1, 1), backend=backend)

    # eager is F.unfold itself (slow under full gradcheck): a random-projection check is enough for it
    assert torch.autograd.gradcheck(fn, (leaf,), fast_mode=backend == "eager")
    if backend != "eager":  # the backward op's derivative is the forward op (eager's double backward is slow)
        assert torch.autograd.gradgradcheck(fn, (leaf,))


@pytest.mark.parametrize("op_name", ["soft_split", "soft_split_triton"])
@pytest.mark.parametrize("layout", ["contiguous", "token_view"])
def test_opcheck(op_name, layout):
    skip_unless_available("cpp" if op_name == "soft_split" else "triton")
    op = getattr(torch.ops.t2t_kernels, op_name)
    backward = getattr(torch.ops.t2t_kernels, op_name + "_backward")
    leaf, view = make_input(2, 3, 9, 8, layout)
    x = view(leaf).requires_grad_()
    args = ([3, 3], [2, 2], [1, 1])
    torch.library.opcheck(op, (x, *args))
    out = op(x, *args)
    grad_out = torch.randn_like(out)
    for channels_last in (False, True):
        torch.library.opcheck(backward, (grad_out, list(x.shape), *args, channels_last))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) through the token view and the op: no graph break, same values and grads."""
    skip_unless_available(backend)

    def t2t_step(tokens, image):
        B, N, C = tokens.shape
        a = soft_split(image, 7, 4, 2, backend=backend)
        b = soft_split(tokens.transpose(1, 2).reshape(B, C, 4, 4), 3, 2, 1, backend=backend)
        return a.sin().sum() + b.cos().sum()

    assert_compiles_like_eager(t2t_step, [torch.randn(2, 16, 5), torch.randn(2, 3, 16, 16)])


def test_export():
    skip_unless_available("cpp")

    class Split(torch.nn.Module):
        def forward(self, x):
            return soft_split(x, 3, 2, 1, backend="cpp")

    x = torch.randn(2, 4, 9, 9)
    program = torch.export.export(Split(), (x,))
    assert any("soft_split" in str(node.target) for node in program.graph.nodes)
    assert torch.equal(program.module()(x), unfold_reference(x, 3, 2, 1))


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_poisoned_outputs_are_fully_written(backend):
    """With every fresh allocation NaN-filled, outputs that are mostly padding (windows past every edge) must come
    back NaN-free: the kernels write the zeros of the padding, and backward writes every pixel."""
    skip_unless_available(backend)
    assert torch.empty(8).isnan().all(), "tests/conftest.py's NaN poisoning is off"
    for layout in ("contiguous", "token_view"):
        leaf, view = make_input(1, 2, 3, 4, layout)
        leaf.requires_grad_()
        out = soft_split(view(leaf), 5, 2, 4, backend=backend)
        assert not out.isnan().any()
        out.backward(torch.ones_like(out))
        assert not leaf.grad.isnan().any()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_deterministic(backend):
    """Two runs (cpp: with 1 and with 2+ threads) give bitwise the same output and gradient."""
    skip_unless_available(backend)
    leaf0, view = make_input(3, 5, 19, 17, "token_view")
    threads = torch.get_num_threads()
    results = []
    for num_threads in (1, max(2, threads)):
        torch.set_num_threads(num_threads)
        try:
            leaf = leaf0.detach().clone().requires_grad_()
            out = soft_split(view(leaf), 3, 2, 1, backend=backend)
            out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).sin())
        finally:
            torch.set_num_threads(threads)
        results.append((out, leaf.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


# --- GPU ---------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stage", STAGES, ids=STAGE_IDS)
def test_cuda_model_shapes(backend, dtype, stage):
    skip_unless_available(backend, dtype, "cuda")
    (C, H, W), layout, k, s, p = stage
    check_forward_backward(backend, *make_input(4, C, H, W, layout, dtype, device="cuda"), k, s, p)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cuda_odd_shapes(backend, shape, layout):
    skip_unless_available(backend, torch.float32, "cuda")
    B, C, H, W, k, s, p = shape
    check_forward_backward(backend, *make_input(B, C, H, W, layout, device="cuda"), k, s, p)


@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_fixed_tiles_equal_the_autotuned_ones(monkeypatch, channels_last):
    """T2T_TRITON_AUTOTUNE=0 (scripts/gpu_checks.sh's default) launches one fixed tile: the same outputs and
    gradients as the autotuned configs (a gather and a fixed-order sum per element, whatever the tile)."""
    skip_unless_available("triton", torch.bfloat16, "cuda")
    x = torch.randn(3, 5, 19, 23, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(3, 10 * 12, 5 * 9, device="cuda", dtype=torch.bfloat16)
    results = []
    for autotune in ("1", "0"):
        monkeypatch.setenv("T2T_TRITON_AUTOTUNE", autotune)
        leaf = x.detach().requires_grad_()
        out = soft_split(leaf, 3, 2, 1, backend="triton")
        out.backward(grad)
        results.append((out, leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_int64_indexing(backend):
    """An output past 2**31 elements (bf16, ~4.3 GB): the tail windows land where int32 offsets would wrap."""
    skip_unless_available(backend, torch.bfloat16, "cuda")
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    x = torch.randn(300, 64, 226, 226, device="cuda", dtype=torch.bfloat16)  # 300 * 113**2 * 576 > 2**31 outputs
    out = soft_split(x, 3, 2, 1, backend=backend)
    assert out.numel() > 2**31
    torch.testing.assert_close(out[-1], unfold_reference(x[-1:], 3, 2, 1)[0], rtol=0, atol=0)
    grad = soft_split_backward_op(backend)(out, list(x.shape), [3, 3], [2, 2], [1, 1], False)
    torch.testing.assert_close(grad[-1:].float(), fold_reference(out[-1:].float(), (226, 226), 3, 2, 1),
                               rtol=1.6e-2, atol=1.6e-2)


def soft_split_backward_op(backend):
    return (torch.ops.t2t_kernels.soft_split_triton_backward if backend == "triton"
            else torch.ops.t2t_kernels.soft_split_backward)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(3, 8, 8), 3, 2, 1), ValueError, "x must be 4-D"),
        ((torch.randn(1, 2, 3, 8, 8), 3, 2, 1), ValueError, "x must be 4-D"),
        ((torch.randn(1, 2, 4, 4), 7, 1, 1), ValueError, "kernel_size .* larger than the padded input height"),
        ((torch.randn(1, 2, 8, 4), (3, 7), 1, (1, 1)), ValueError, "larger than the padded input width"),
        ((torch.randn(1, 2, 8, 8), 3, 0, 1), ValueError, "stride must be positive"),
        ((torch.randn(1, 2, 8, 8), 3, (2, -1), 1), ValueError, "stride must be positive"),
        ((torch.randn(1, 2, 8, 8), 3, 2, -1), ValueError, "padding must be non-negative"),
        ((torch.randn(1, 2, 8, 8), 0, 2, 1), ValueError, "kernel_size must be positive"),
        ((torch.randn(1, 2, 8, 8), 3.0, 2, 1), TypeError, "kernel_size must be an int or a pair"),
        ((torch.randn(1, 2, 8, 8), 3, (2, 2, 2), 1), TypeError, "stride must be an int or a pair"),
        ((torch.randn(1, 2, 8, 8), 3, 2, True), TypeError, "padding must be an int or a pair"),
        ((torch.randn(1, 0, 8, 8), 3, 2, 1), ValueError, "at least one channel"),
        ((torch.randn(1, 2, 0, 8), 3, 2, 2), ValueError, "non-empty image, got height 0"),
        ((torch.randn(1, 2, 8, 0), 3, 2, 2), ValueError, "non-empty image, got height 8 and width 0"),
        ((torch.ones(1, 2, 8, 8, dtype=torch.int32), 3, 2, 1), TypeError, "floating-point"),
        ((torch.randn(1, 2, 8, 8).numpy(), 3, 2, 1), TypeError, "x must be a Tensor"),
    ],
    ids=["ndim-3", "ndim-5", "kernel-too-tall", "kernel-too-wide", "stride-zero", "stride-negative",
         "padding-negative", "kernel-zero", "kernel-float", "stride-triple", "padding-bool", "no-channels",
         "height-0", "width-0", "integer", "numpy"],
)
@pytest.mark.parametrize("backend", [None, "eager", "cpp"])
def test_bad_input(args, error, match, backend):
    with pytest.raises(error, match=match):
        soft_split(*args, backend=backend)


def test_unavailable_backend_is_a_clear_error():
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        soft_split(x, 3, 2, 1, backend="cuda")
    with pytest.raises(RuntimeError, match="not supported by backend 'triton'"):
        soft_split(x.double(), 3, 2, 1, backend="triton")
    with pytest.raises(RuntimeError, match="not supported by backend 'cuda'"):
        soft_split(x.double(), 3, 2, 1, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        soft_split(x, 3, 2, 1, backend="fast")
    if BACKENDS.unavailable_reason("cpp", x.device, x.dtype) is None:
        with pytest.raises(RuntimeError, match="backend 'cpp' runs on cpu tensors, got a meta tensor"):
            soft_split(x.to("meta"), 3, 2, 1, backend="cpp")


@requires_cuda
def test_cuda_tensor_with_cpu_backend():
    with pytest.raises(RuntimeError, match="backend 'cpp' runs on cpu tensors, got a cuda tensor"):
        soft_split(torch.randn(1, 2, 8, 8, device="cuda"), 3, 2, 1, backend="cpp")


def test_compiled_op_rejects_bad_input():
    """The C++ op checks its arguments itself (it can be called without the Python wrapper)."""
    skip_unless_available("cpp")
    op, backward = torch.ops.t2t_kernels.soft_split, torch.ops.t2t_kernels.soft_split_backward
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match=r"x must be 4-D \(B, C, H, W\)"):
        op(x[0], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="stride must be positive"):
        op(x, [3, 3], [0, 2], [1, 1])
    with pytest.raises(RuntimeError, match="padding must be non-negative"):
        op(x, [3, 3], [2, 2], [-1, 1])
    with pytest.raises(RuntimeError, match="kernel_size must be positive"):
        op(x, [0, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        op(x, [11, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        op(x.int(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="non-empty image"):
        op(x[:, :, :0], [3, 3], [2, 2], [2, 2])
    with pytest.raises(RuntimeError, match="is too large"):  # 2 * padding would overflow int64
        op(x, [3, 3], [1, 1], [2**62, 1])
    with pytest.raises(RuntimeError, match="overflows int64"):
        op(x, [3, 3], [1, 1], [2**40, 2**40])
    out = op(x, [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match=r"grad_out must be \(B, L, C\*kh\*kw\) = \(1, 16, 18\)"):
        backward(out[:, :5], [1, 2, 8, 8], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match=r"grad_out must be \(B, L, C\*kh\*kw\)"):
        backward(out, [1, 3, 8, 8], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="grad_out must be float32"):
        backward(out.int(), [1, 2, 8, 8], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="padding must be non-negative"):
        backward(out, [1, 2, 8, 8], [3, 3], [2, 2], [-1, 1])


def test_triton_host_functions_reject_bad_input(monkeypatch):
    skip_unless_available("triton")
    from t2t_kernels.ops.soft_split import triton as tri

    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        tri.soft_split_forward(x.double(), (3, 3), (2, 2), (1, 1))
    with pytest.raises(ValueError, match="invalid geometry"):
        tri.soft_split_forward(x, (3, 3), (0, 2), (1, 1))
    out = tri.soft_split_forward(x, (3, 3), (2, 2), (1, 1))
    with pytest.raises(ValueError, match=r"grad_out must be \(B, L, C\*kh\*kw\)"):
        tri.soft_split_backward(out[:, :5], (1, 2, 8, 8), (3, 3), (2, 2), (1, 1))
    # a CPU tensor outside the interpreter: a device error, not a launch on host memory
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="grad_out must be a CUDA tensor"):
        tri.soft_split_backward(out, (1, 2, 8, 8), (3, 3), (2, 2), (1, 1))
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        tri.soft_split_forward(x, (3, 3), (2, 2), (1, 1))
