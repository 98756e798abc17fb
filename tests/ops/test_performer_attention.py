"""performer_attention against the float64 eager reference, for every backend that can run here.

Triton runs on CPU tensors through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU),
so its shapes stay small; the CUDA test at model shapes skips without a GPU.
"""
import pytest
import torch

from t2t_kernels.ops import performer_attention
from virtual_views import views_past_int32
from t2t_kernels.ops.performer_attention import BACKENDS, reference

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# (rtol, atol) per input dtype, against float64 math on the same (rounded) inputs; atol scales with the output's size
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
DTYPES = {
    "eager": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float64, torch.float32, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
# (leading dims, T, E, m): T = 1, 7, 63, ~200, E in {16, 64} plus an odd 24, m in {8, 32}
SHAPES = [
    ((2,), 1, 16, 8),
    ((2,), 7, 64, 32),
    ((2, 3), 63, 16, 8),
    ((1,), 201, 64, 32),
    ((2,), 33, 24, 8),
]
EPS = 1e-8


def shape_id(shape):
    lead, T, E, m = shape
    return "x".join(map(str, lead)) + f"-T{T}-E{E}-m{m}"


def skip_unless_available(backend, dtype=torch.float32, device="cpu"):
    reason = BACKENDS.unavailable_reason(backend, torch.device(device), dtype)
    if reason:
        pytest.skip(reason)


def make_inputs(lead, T, E, m, dtype, device="cpu", requires_grad=False):
    """q, k, v as the non-contiguous thirds of one (..., T, 3E) tensor (as from the kqv Linear), and the model's w:
    orthogonal rows scaled by sqrt(m). Inputs of norm ~ sqrt(E)/2 keep phi away from underflow, as LayerNorm does."""
    x = (0.5 * torch.randn(*lead, T, 3 * E, device=device)).to(dtype).requires_grad_(requires_grad)
    q, k, v = x.split(E, dim=-1)
    w = torch.nn.init.orthogonal_(torch.empty(m, E)) * m**0.5
    return x, (q, k, v), w.to(device)


def reference_with_grads(q, k, v, w, grad):
    """y and (gq, gk, gv) of the float64 eager reference on the same (already rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y = reference.performer_attention(*leaves, w.double(), EPS)
    y.backward(grad.double())
    return y.detach(), [t.grad for t in leaves]


def assert_close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    scale = expected.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale)


def run_and_grads(backend, q, k, v, w):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    y = performer_attention(*leaves, w, eps=EPS, backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)
    return y, [t.grad for t in leaves], grad


def backend_dtype_params():
    return [pytest.param(b, d, id=f"{b}-{str(d).removeprefix('torch.')}") for b in DTYPES for d in DTYPES[b]]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_matches_float64_reference(backend, dtype, shape):
    skip_unless_available(backend, dtype)
    _, (q, k, v), w = make_inputs(*shape, dtype)
    y, grads, grad_y = run_and_grads(backend, q, k, v, w)
    y_ref, grads_ref = reference_with_grads(q, k, v, w, grad_y)
    assert y.dtype == dtype and y.shape == q.shape
    assert_close(y, y_ref, dtype)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype, name
        assert_close(g, g_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES["triton"], ids=lambda d: str(d).removeprefix("torch."))
def test_triton_programs_sum_several_blocks(monkeypatch, dtype):
    """The reducing Triton kernels (forward state, backward query pass) sum up to 4 blocks of rows per program once
    B * blocks reaches TARGET_PROGRAMS (1024, model shapes on a GPU); here a target of 1 makes them do so at T = 300:
    with 32-row blocks three programs per batch element, the third with 44 rows and 2 blocks past T (masked); with
    the split-bf16 kernels' 64-row blocks (both passes) two, the second with 44 rows and 3 blocks past T."""
    skip_unless_available("triton", dtype)
    from t2t_kernels.ops.performer_attention import triton as performer_triton

    monkeypatch.setattr(performer_triton, "TARGET_PROGRAMS", 1)
    n_blocks, n_chunks, blocks_per_program, meta = performer_triton._launch_config(2, 300, 64, 32, dtype)
    expected = (64, 5, 4, 2) if dtype == torch.bfloat16 else (32, 10, 4, 3)
    assert (meta["BLOCK_T"], n_blocks, blocks_per_program, n_chunks) == expected
    _, (q, k, v), w = make_inputs((2,), 300, 64, 32, dtype)
    y, grads, grad_y = run_and_grads("triton", q, k, v, w)
    y_ref, grads_ref = reference_with_grads(q, k, v, w, grad_y)
    assert_close(y, y_ref, dtype)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, dtype)


# CUDA's grid limits: 2^31 - 1 programs on the first axis, 65535 on the second and third
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.mark.parametrize("B,T", [(1, 2**25 + 4097), (70000, 64)], ids=["long-sequence", "big-batch"])
def test_triton_grids_fit_cuda_limits(monkeypatch, B, T):
    """Every Triton launch stays within CUDA's grid limits. The (B, chunks) grids put 262177 programs on the second
    axis for one sequence of 2^25 + 4097 tokens, which the H100 refused ("invalid argument"); the kernels now run on
    1-D grids. Launches are recorded, not run, on meta tensors: no memory, no GPU."""
    pytest.importorskip("triton")
    from t2t_kernels.ops.performer_attention import triton as performer_triton

    grids = []

    class RecordedKernel:  # kernel[grid](...) records the grid (the launch protocol of every Triton version)
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append((self.name, tuple(grid)))

    for name in ("_performer_fwd_state_kernel", "_performer_fwd_output_kernel", "_performer_bwd_query_kernel",
                 "_performer_bwd_key_value_kernel"):
        monkeypatch.setattr(performer_triton, name, RecordedKernel(name))
    q = torch.empty(B, T, 64, device="meta", dtype=torch.bfloat16)
    w = torch.empty(32, 64, device="meta")
    y, kv_state, k_sum = performer_triton.performer_attention_forward(q, q, q, w, EPS)
    performer_triton.performer_attention_backward(y, q, q, q, w, kv_state, k_sum, EPS)
    assert len(grids) == 4
    for name, grid in grids:
        assert all(0 < n <= limit for n, limit in zip(grid, GRID_LIMITS)), (name, grid)


def test_tile_override_sets_every_launch_and_rejects_malformed_tiles(monkeypatch):
    """T2T_PERFORMER_TILE (scripts/tune_performer.py's candidates) sets the rows and warps of every launch; a
    malformed value is an error that names the variable."""
    pytest.importorskip("triton")
    from t2t_kernels.ops.performer_attention import triton as performer_triton

    monkeypatch.setenv("T2T_PERFORMER_TILE", "128,2")
    for dtype in (torch.bfloat16, torch.float32):
        n_blocks, _, _, meta = performer_triton._launch_config(2, 300, 64, 32, dtype)
        assert (meta["BLOCK_T"], meta["num_warps"], n_blocks) == (128, 2, 3), dtype
    for bad in ("48,4", "64", "64,3", "8,4", "a,b"):
        monkeypatch.setenv("T2T_PERFORMER_TILE", bad)
        with pytest.raises(ValueError, match="T2T_PERFORMER_TILE"):
            performer_triton._launch_config(2, 300, 64, 32, torch.bfloat16)


@pytest.mark.parametrize("dtype,E,split_env,tile", [
    (torch.bfloat16, 64, None, (64, 4)),  # split-bf16, both passes: the H100's fastest (_default_tile)
    (torch.bfloat16, 32, None, (64, 4)),
    (torch.bfloat16, 64, "0", (32, 8)),  # bf16 on the FMA path
    (torch.float16, 64, None, (32, 8)),
    (torch.float32, 64, None, (32, 8)),
    (torch.bfloat16, 128, None, (16, 8)),
    (torch.float32, 128, None, (16, 8)),
], ids=str)
def test_default_tiles(monkeypatch, dtype, E, split_env, tile):
    """The tile every launch (both passes) takes without T2T_PERFORMER_TILE, by dtype, width and product path."""
    pytest.importorskip("triton")
    from t2t_kernels.ops.performer_attention import triton as performer_triton

    monkeypatch.delenv("T2T_PERFORMER_TILE", raising=False)
    if split_env is None:
        monkeypatch.delenv("T2T_PERFORMER_SPLIT_BF16", raising=False)
    else:
        monkeypatch.setenv("T2T_PERFORMER_SPLIT_BF16", split_env)
    _, _, _, meta = performer_triton._launch_config(2, 4096, E, E // 2, dtype)
    assert (meta["BLOCK_T"], meta["num_warps"]) == tile
    assert meta["SPLIT"] == (dtype == torch.bfloat16 and split_env != "0")


def test_tune_script_checks_and_times_every_tile(tmp_path):
    """scripts/tune_performer.py at a tiny size (interpreted on a CPU): each tile matches the default tile's y and
    gradients, and every case times every tile."""
    skip_unless_available("triton", torch.bfloat16)
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "tune_performer.py"
    spec = importlib.util.spec_from_file_location("tune_performer", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rc = script.main(["--device", "cpu", "--dtype", "bf16", "--batch", "1", "--img-size", "32", "--tiles", "16,4 64,2",
                      "--min-time", "0", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "tune_performer.json").read_text())["rows"]
    assert rc == 0 and len(rows) == 4 * 3  # 2 stages x 2 passes, the default tile and two candidates
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows)
    assert all(r["kernel_s"] is None for r in rows)  # the kernels' time is a GPU's (torch.profiler's CUDA events)


def ulps_off(actual, expected_fp64, dtype):
    """max |actual - expected| in units of the dtype's last place at the expected value; values under 1/64 of the
    largest count at that floor (where the numerator's sum cancels, fp32 math loses relative accuracy too)."""
    magnitude = expected_fp64.abs().clamp_min(expected_fp64.abs().max().item() / 64)
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    return ((actual.double() - expected_fp64).abs() / ulp).max().item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_triton_16bit_inputs_keep_fp32_accuracy(dtype, device):
    """y within 1.25 ulps of the float64 result, as fp32 math rounded once gives: 0.5 ulp on a GPU, 1 in Triton's
    interpreter (its bf16 store truncates), plus 0.25 for the products. bf16 takes split-bf16 tensor-core products
    (1.06 ulps interpreted); one product of the hi parts alone was 41 ulps off, and fp16 inputs through the three
    split products 2.6: both fail. fp16 keeps fp32 FMA products (0.5)."""
    skip_unless_available("triton", dtype, device)
    _, (q, k, v), w = make_inputs((2,), 201, 64, 32, dtype, device=device)
    y = performer_attention(q, k, v, w, eps=EPS, backend="triton")
    y_ref = reference.performer_attention(*(t.double().cpu() for t in (q, k, v, w)), EPS)
    assert ulps_off(y.cpu(), y_ref, dtype) <= 1.25


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_offsets_past_int32(backend):
    """q, k, v as (3, 40, 64) views whose batch stride is 2^30 + 2^20 elements, into one 4.3 GB storage (virtual:
    tests/virtual_views.py): element offsets of the last sequence pass 2^31, as in a batch with B * T * E > 2^31.
    The Triton kernels once formed them in int32 (under the interpreter: a segfault)."""
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    skip_unless_available(backend, dtype)
    B, T, E, m = 3, 40, 64, 32
    q, k, v = views_past_int32((B, T, E), 3, dtype, scale=0.5)
    assert q.stride(0) > T * E  # views, not copies
    w = torch.nn.init.orthogonal_(torch.empty(m, E)) * m**0.5
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # the views themselves (run_and_grads would copy)
    y = performer_attention(*leaves, w, eps=EPS, backend=backend)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_ref, grads_ref = reference_with_grads(q, k, v, w, grad_y)
    assert_close(y, y_ref, dtype)
    for leaf, g_ref in zip(leaves, grads_ref):
        assert_close(leaf.grad, g_ref, dtype)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_gradcheck_float64(backend):
    skip_unless_available(backend, torch.float64)
    x, _, w = make_inputs((2,), 5, 6, 4, torch.float64, requires_grad=True)
    w = w.double()

    def fn(x):
        return performer_attention(*x.split(6, dim=-1), w, eps=EPS, backend=backend)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def gradient_penalty_grads(backend, dtype):
    """d/d(q|k|v, grad_y) of |d y/d(q|k|v) . grad_y|^2: a gradient penalty through the op (double backward)."""
    torch.manual_seed(0)
    x, _, w = make_inputs((2,), 9, 8, 4, dtype, requires_grad=True)
    y = performer_attention(*x.split(8, dim=-1), w.to(dtype), eps=EPS, backend=backend)
    grad_y = torch.randn_like(y).requires_grad_()
    (gx,) = torch.autograd.grad(y, x, grad_y, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), (x, grad_y), allow_unused=True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_double_backward_matches_eager(backend):
    """The fused backward has no derivative of its own: under create_graph the op's gradient comes from the eager
    formula under autograd, so a gradient penalty matches eager's (the backward op alone would cut the graph)."""
    dtype = torch.float64 if backend == "cpp" else torch.float32
    skip_unless_available(backend, dtype)
    got, want = gradient_penalty_grads(backend, dtype), gradient_penalty_grads("eager", dtype)
    rtol, atol = TOLERANCES[dtype]
    for name, g, e in zip(("q|k|v", "grad_y"), got, want):
        assert g is not None, f"the second derivative with respect to {name} is missing (graph cut)"
        torch.testing.assert_close(g, e, rtol=rtol * 8, atol=atol * 8, msg=name)


@pytest.mark.parametrize("op_name", ["performer_attention", "performer_attention_triton"])
def test_opcheck(op_name):
    skip_unless_available("cpp" if op_name == "performer_attention" else "triton")
    op = getattr(torch.ops.t2t_kernels, op_name)
    backward = getattr(torch.ops.t2t_kernels, op_name + "_backward")
    _, (q, k, v), w = make_inputs((2,), 7, 16, 8, torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(op, (q, k, v, w, EPS))
    y, kv_state, k_sum = op(q, k, v, w, EPS)
    torch.library.opcheck(backward, (torch.randn_like(y), q.detach(), k.detach(), v.detach(), w, kv_state, k_sum, EPS))


def test_compile_fullgraph_cpp():
    skip_unless_available("cpp")
    _, (q, k, v), w = make_inputs((2,), 20, 16, 8, torch.float32)

    def attend(q, k, v):
        return performer_attention(q, k, v, w, eps=EPS, backend="cpp").sin()

    compiled = torch.compile(attend, fullgraph=True)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected_args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    compiled(*args).sum().backward()
    attend(*expected_args).sum().backward()
    for got, want in zip(args, expected_args):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_deterministic(backend):
    """Two runs (for cpp with different thread counts) give bitwise the same output and gradients."""
    skip_unless_available(backend)
    _, (q, k, v), w = make_inputs((2,), 300, 16, 8, torch.float32)
    threads = torch.get_num_threads()
    results = []
    for num_threads in (1, max(2, threads)):
        torch.set_num_threads(num_threads)
        try:
            torch.manual_seed(0)
            y, grads, _ = run_and_grads(backend, q, k, v, w)
        finally:
            torch.set_num_threads(threads)
        results.append([y] + grads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_official_formula_overflows_in_fp16_but_ours_does_not():
    """Rows of q, k close to rows of w put the exponent near its maximum |w_j|^2 / 2 = 16: phi ~ 1e6, beyond fp16.
    The official formula under fp16 autocast runs its einsums in fp16 and returns NaN (its issues #19, #65, #69);
    ours keeps the exponent and sums in fp32: finite and close to float64 for fp16 inputs (eager), and for fp32
    under the same autocast and bf16 inputs (cpp, which has no fp16)."""
    B, T, E, m = 2, 64, 64, 32
    w = torch.nn.init.orthogonal_(torch.empty(m, E)) * m**0.5
    q, k = (w[torch.randint(m, (B, T))] + 0.1 * torch.randn(B, T, E) for _ in range(2))
    v = torch.randn(B, T, E)
    with torch.autocast("cpu", dtype=torch.float16):
        official = reference.performer_attention_official(q, k, v, w)
    assert official.isnan().any()

    def reference_on(*inputs):
        return reference.performer_attention(*(t.double() for t in inputs), w.double(), EPS)

    half = [t.half() for t in (q, k, v)]
    y = performer_attention(*half, w, eps=EPS, backend="eager")
    assert y.isfinite().all()
    assert_close(y, reference_on(*half), torch.float16)
    if BACKENDS.unavailable_reason("cpp", q.device, torch.float32) is None:
        with torch.autocast("cpu", dtype=torch.float16):
            y32 = performer_attention(q, k, v, w, eps=EPS, backend="cpp")
        assert_close(y32, reference_on(q, k, v), torch.float32)
        bf16 = [t.bfloat16() for t in (q, k, v)]
        y_bf16 = performer_attention(*bf16, w, eps=EPS, backend="cpp")
        assert y_bf16.isfinite().all()
        assert_close(y_bf16, reference_on(*bf16), torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [784, 3136])
def test_cuda_model_shapes(backend, dtype, T):
    skip_unless_available(backend, dtype, "cuda")
    _, (q, k, v), w = make_inputs((4,), T, 64, 32, dtype, device="cuda")
    y, grads, grad_y = run_and_grads(backend, q, k, v, w)
    y_ref, grads_ref = reference_with_grads(q, k, v, w, grad_y)
    assert_close(y, y_ref, dtype)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_triton_bf16_split_products_as_accurate_as_fp32_products(monkeypatch, device):
    """bf16's split-bf16 tensor-core products against fp32 FMA products (T2T_PERFORMER_SPLIT_BF16=0) on the same
    inputs: y and every gradient as close to float64 (relative max error; 4e-3 to 7e-3 for both, the bf16 outputs'
    rounding). One product of the hi parts alone triples y's error (2.0e-2 against 6.8e-3), and fails."""
    skip_unless_available("triton", torch.bfloat16, device)
    _, (q, k, v), w = make_inputs((2,), 201, 64, 32, torch.bfloat16, device=device)
    errors = {}
    for split in ("1", "0"):
        monkeypatch.setenv("T2T_PERFORMER_SPLIT_BF16", split)
        torch.manual_seed(0)  # the same upstream gradient
        y, grads, grad_y = run_and_grads("triton", q, k, v, w)
        y_ref, grads_ref = reference_with_grads(q, k, v, w, grad_y)  # float64 on the same device
        errors[split] = [((a.double() - e).abs().max() / e.abs().max()).item()
                         for a, e in zip([y, *grads], [y_ref, *grads_ref])]
    for name, split_error, fma_error in zip(("y", "gq", "gk", "gv"), errors["1"], errors["0"]):
        assert split_error <= 1.1 * fma_error + 1e-4, (name, split_error, fma_error)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_triton_split_products_of_bf16_rows_skip_only_zero_terms(device):
    """_dot takes an input's bf16 rows as they are and runs two split products instead of three (the product of
    their lo part, exactly zero, is skipped): the result equals, bitwise, that of the same rows widened to fp32 on
    the three-product path, with the bf16 tile on either side."""
    skip_unless_available("triton", torch.bfloat16, device)
    import triton.language as tl
    from performer_dot_probe import split_products

    from t2t_kernels.ops.performer_attention.triton import triton_interpreting

    n = 32
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device) * 3
    out = torch.full((4, n, n), float("nan"), device=device)
    part = tl.float32 if triton_interpreting() else tl.bfloat16  # as the op's kernels take it
    split_products[(1,)](a, b, out, N=n, PART=part)
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3])
    # and they are the products: within the split's ~2^-16 of the float64 ones
    for got, want in ((out[0], a.double() @ b.double()), (out[2], b.double() @ a.double())):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-4


# --- bad input -------------------------------------------------------------------------------------------------


def small_inputs(dtype=torch.float32):
    _, (q, k, v), w = make_inputs((2,), 7, 16, 8, dtype)
    return q, k, v, w


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q, k, v, w: (q, k[:, :5], v, w, EPS), ValueError, "same shape"),
        (lambda q, k, v, w: (q, k, v, w[:, :8], EPS), ValueError, r"w must be \(m, E\)"),
        (lambda q, k, v, w: (q, k, v, w, 0.0), ValueError, "eps must be a positive"),
        (lambda q, k, v, w: (q, k, v, w, -1e-8), ValueError, "eps must be a positive"),
        (lambda q, k, v, w: (q.int(), k.int(), v.int(), w, EPS), TypeError, "must be floating point"),
        (lambda q, k, v, w: (q, k.double(), v, w, EPS), TypeError, "share a dtype"),
    ],
    # a w requiring a gradient: tests/hardening/test_bad_input.py (refused by an explicit kernel backend only)
    ids=["shape", "w-width", "eps-zero", "eps-negative", "integer", "mixed-dtype"],
)
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        performer_attention(*change(*small_inputs()))


def test_unavailable_backend_is_a_clear_error():
    q, k, v, w = small_inputs()
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        performer_attention(q, k, v, w, backend="cuda")
    with pytest.raises(RuntimeError, match="not supported by backend 'cpp'"):
        performer_attention(q.half(), k.half(), v.half(), w, backend="cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        performer_attention(q, k, v, w, backend="fast")


@requires_cuda
def test_mixed_devices():
    q, k, v, w = small_inputs()
    with pytest.raises(ValueError, match="one device"):
        performer_attention(q, k.cuda(), v, w)


def test_compiled_op_rejects_bad_input():
    skip_unless_available("cpp")
    q, k, v, w = small_inputs()
    op, backward = torch.ops.t2t_kernels.performer_attention, torch.ops.t2t_kernels.performer_attention_backward
    with pytest.raises(RuntimeError, match="q, k, v must have the same shape"):
        op(q, k[:, :5], v, w, EPS)
    with pytest.raises(RuntimeError, match=r"w must be \(m, E\)"):
        op(q, k, v, w[:, :8], EPS)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        op(q, k, v, w, 0.0)
    with pytest.raises(RuntimeError, match="must be float32, float64 or bfloat16"):
        op(q.half(), k.half(), v.half(), w, EPS)
    with pytest.raises(RuntimeError, match=r"q must be \(B, T, E\)"):
        op(q[0], k[0], v[0], w, EPS)
    y, kv_state, k_sum = op(q, k, v, w, EPS)
    with pytest.raises(RuntimeError, match=r"kv_state must be \(B, m, E\)"):
        backward(y, q, k, v, w, kv_state[:, :4], k_sum, EPS)
    with pytest.raises(RuntimeError, match=r"k_sum must be \(B, m\)"):
        backward(y, q, k, v, w, kv_state, k_sum.double(), EPS)
    with pytest.raises(RuntimeError, match="grad_y must be"):
        backward(y[:, :3], q, k, v, w, kv_state, k_sum, EPS)
