"""dropout_add (residual + dropout(x, p) with a Philox mask): the generator against its published known answers, the
cpp kernel bitwise against the eager formula over dtypes, odd sizes and layouts, the mask's statistics, gradients
(gradcheck, double backward), opcheck, torch.compile, forward-mode AD, thread-count independence, bad input."""
import pytest
import torch

from op_params import dtype_name, skip_unless_available
from t2t_kernels.ops import DROPOUT_ADD_BACKENDS, dropout_add
from t2t_kernels.ops.dropout_add import draw_seed, reference

DTYPES = DROPOUT_ADD_BACKENDS.dtypes["cpp"]
# odd sizes: a single element, fewer than one Philox call's 4 words, not a whole kernel block (256), several tasks
SHAPES = [(1,), (3,), (2, 257), (3, 1001, 7)]


def skip_unless(backend, dtype=torch.float32):
    skip_unless_available(DROPOUT_ADD_BACKENDS, backend, dtype)


def make(shape, dtype, layout, generator):
    """x and residual of `shape`: contiguous, or transposed views of contiguous tensors (non-contiguous inputs)."""
    transposed = layout == "transposed" and len(shape) >= 2
    base_shape = (*shape[:-2], shape[-1], shape[-2]) if transposed else shape

    def make_one():
        t = torch.randn(*base_shape, generator=generator).to(dtype)
        return t.transpose(-1, -2) if transposed else t

    return make_one(), make_one()


def test_philox_known_answers():
    """Philox4x32-10 of Random123's known-answer vectors (counter, key -> output)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        assert tuple(reference.philox4x32_10(torch.tensor([counter]), key)[0].tolist()) == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_cpp_matches_eager_bitwise(dtype, shape, layout, residual, fresh_seed):
    """The kernel's output is the eager formula's, bit for bit: the same mask, the product rounded before the sum."""
    skip_unless("cpp", dtype)
    generator = torch.Generator().manual_seed(fresh_seed)
    x, r = make(shape, dtype, layout, generator)
    r = r if residual else None
    for p, seed in ((0.1, fresh_seed), (0.5, -(2**63)), (0.9, 2**63 - 1)):
        out = dropout_add(x, r, p, seed, backend="cpp")
        want = reference.dropout_add(x, r, p, seed)
        assert out.is_contiguous() and out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, want), (p, seed, (out != want).sum().item())
        assert torch.equal(dropout_add(x, r, p, seed, backend="eager"), want)


def test_mask_statistics():
    """Kept fraction 1 - p within 5 sigma, kept elements exactly x / (1 - p), neighbours independent (both kept at
    (1 - p)^2), and seeds apart give unrelated masks (agreement p^2 + (1 - p)^2)."""
    skip_unless("cpp")
    n, p = 1 << 20, 0.1
    x = torch.rand(n) + 1.0  # nonzero: a dropped element is exactly 0
    out = dropout_add(x, None, p, 1234, backend="cpp")
    kept = out != 0
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma
    torch.testing.assert_close(out[kept], x[kept] * torch.tensor(1 / (1 - p), dtype=torch.float32), rtol=0, atol=0)
    for lag in (1, 4, 256):  # within a Philox call, across calls, across kernel blocks
        both = (kept[:-lag] & kept[lag:]).double().mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * (0.25 / n) ** 0.5, lag
    other = dropout_add(x, None, p, 1235, backend="cpp") != 0
    agree = (kept == other).double().mean().item()
    assert abs(agree - (p**2 + (1 - p) ** 2)) < 5 * (0.25 / n) ** 0.5
    assert torch.equal(dropout_add(x, None, p, 1234, backend="cpp"), out)  # the same seed, the same mask


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_p_zero_and_one(backend):
    """p = 0 keeps everything (residual + x), p = 1 drops everything (residual + x * 0: NaN stays NaN)."""
    skip_unless(backend)
    x, r = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(dropout_add(x, r, 0.0, 7, backend=backend), r + x, rtol=0, atol=0)
    torch.testing.assert_close(dropout_add(x, None, 0.0, 7, backend=backend), x, rtol=0, atol=0)
    torch.testing.assert_close(dropout_add(x, r, 1.0, 7, backend=backend), r, rtol=0, atol=0)
    x[0, 0] = float("nan")
    assert dropout_add(x, r, 1.0, 7, backend=backend)[0, 0].isnan()


def test_nan_in_a_dropped_element_stays_nan():
    """As F.dropout (x * mask), a dropped NaN or inf gives NaN, not 0."""
    skip_unless("cpp")
    x = torch.randn(4096)
    mask = reference.keep_mask(x.shape, 0.5, 99)
    dropped = (~mask).nonzero()[:2, 0]
    x[dropped[0]], x[dropped[1]] = float("nan"), float("inf")
    out = dropout_add(x, torch.zeros_like(x), 0.5, 99, backend="cpp")
    assert out[dropped].isnan().all()
    assert not out[mask].isnan().any()


def test_result_does_not_depend_on_the_thread_count():
    skip_unless("cpp")
    x, r = torch.randn(3, 50001), torch.randn(3, 50001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dropout_add(x, r, 0.3, 5, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(dropout_add(x, r, 0.3, 5, backend="cpp"), one)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_gradcheck_float64(backend):
    """Gradients of x (the same mask) and residual (identity), and the second derivative."""
    skip_unless(backend, torch.float64)
    x = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: dropout_add(a, b, 0.25, 11, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, r))
    assert torch.autograd.gradgradcheck(fn, (x, r))


def test_backward_matches_eager_bitwise():
    """The cpp op's gradient of x is the eager formula's (grad * mask * scale) bit for bit; residual's is grad."""
    skip_unless("cpp")
    x, r = torch.randn(2, 301, requires_grad=True), torch.randn(2, 301, requires_grad=True)
    grad = torch.randn(2, 301)
    got = torch.autograd.grad(dropout_add(x, r, 0.2, 3, backend="cpp"), (x, r), grad)
    want = torch.autograd.grad(reference.dropout_add(x, r, 0.2, 3), (x, r), grad)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_opcheck():
    skip_unless("cpp")
    x, r = torch.randn(4, 33, requires_grad=True), torch.randn(4, 33, requires_grad=True)
    seed = torch.tensor(17)
    torch.library.opcheck(torch.ops.t2t_kernels.dropout_add, (x, r, 0.3, seed))
    torch.library.opcheck(torch.ops.t2t_kernels.dropout_add, (x, None, 0.3, seed))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) through the op: the same values and gradients as the uncompiled call."""
    skip_unless("cpp")
    torch._dynamo.reset()
    x, r = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10, requires_grad=True)

    def fn(a, b):
        return dropout_add(a.sin(), b, 0.4, 21, backend="cpp").cos()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, r)
    got = torch.autograd.grad(out.sum(), (x, r))
    want_out = fn(x, r)
    want = torch.autograd.grad(want_out.sum(), (x, r))
    assert torch.equal(out, want_out) and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_forward_mode_tangent():
    """A forward-mode tangent goes through the eager formula: d out = d residual + d x * mask / (1 - p)."""
    skip_unless("cpp")
    x, r, tx, tr = torch.randn(4, 9), torch.randn(4, 9), torch.randn(4, 9), torch.randn(4, 9)
    out, tangent = torch.func.jvp(lambda a, b: dropout_add(a, b, 0.3, 8, backend="cpp"), (x, r), (tx, tr))
    assert torch.equal(out, reference.dropout_add(x, r, 0.3, 8))
    torch.testing.assert_close(tangent, reference.dropout_add(tx, tr, 0.3, 8), rtol=0, atol=0)


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(3)
    first = [draw_seed().item() for _ in range(3)]
    torch.manual_seed(3)
    assert [draw_seed().item() for _ in range(3)] == first
    assert len(set(first)) == 3
    with torch.device("meta"):  # a default device elsewhere (torch.set_default_device) leaves the seed on the CPU
        seed = draw_seed()
    assert seed.device.type == "cpu" and seed.shape == () and seed.dtype == torch.int64


@pytest.mark.parametrize("seed", [5, -(2**63), 2**63 - 1], ids=["small", "min", "max"])
def test_a_seed_tensor_gives_its_value_s_mask(seed):
    """A 0-dim int64 seed tensor (draw_seed's) and the int it holds give the same mask, in the kernel and the
    eager formula (whose key words stay tensors then)."""
    skip_unless("cpp")
    x, r = torch.randn(3, 101), torch.randn(3, 101)
    want = reference.dropout_add(x, r, 0.3, seed)
    assert torch.equal(reference.dropout_add(x, r, 0.3, torch.tensor(seed)), want)
    assert torch.equal(dropout_add(x, r, 0.3, torch.tensor(seed), backend="cpp"), want)
    assert torch.equal(dropout_add(x, r, 0.3, seed, backend="cpp"), want)


@pytest.mark.parametrize("case,error,match", [
    ("residual-shape", ValueError, r"residual must have x's shape \(4, 5\), got \(5, 4\)"),
    ("residual-dtype", TypeError, "residual must have x's dtype"),
    ("residual-not-tensor", TypeError, "residual must be a Tensor or None, got list"),
    ("integer-x", TypeError, "x must be a floating-point Tensor"),
    ("p-negative", ValueError, r"p must be a probability in \[0, 1\], got -0.1"),
    ("p-nan", ValueError, "p must be a probability"),
    ("p-bool", ValueError, "p must be a probability"),
    ("seed-float", ValueError, r"seed must be an int in \[-2\^63, 2\^63\) or a 0-dim int64 CPU tensor, got 1.5"),
    ("seed-too-large", ValueError, "seed must be an int"),
    ("seed-tensor-float", ValueError, r"a seed tensor must be a 0-dim int64 CPU tensor .*got shape \(\), "
                                      "torch.float32"),
    ("seed-tensor-1d", ValueError, r"a seed tensor must be a 0-dim int64 CPU tensor .*got shape \(1,\)"),
])
def test_bad_input_names_the_argument(case, error, match):
    x, r, p, seed = torch.randn(4, 5), torch.randn(4, 5), 0.1, 1
    if case == "residual-shape":
        r = torch.randn(5, 4)
    elif case == "residual-dtype":
        r = r.double()
    elif case == "residual-not-tensor":
        r = r.tolist()
    elif case == "integer-x":
        x = torch.ones(4, 5, dtype=torch.int64)
    elif case == "p-negative":
        p = -0.1
    elif case == "p-nan":
        p = float("nan")
    elif case == "p-bool":
        p = True
    elif case == "seed-float":
        seed = 1.5
    elif case == "seed-too-large":
        seed = 2**63
    elif case == "seed-tensor-float":
        seed = torch.tensor(1.0)
    elif case == "seed-tensor-1d":
        seed = torch.tensor([1])
    with pytest.raises(error, match=match):
        dropout_add(x, r, p, seed)
