"""ops._onednn.linear (F.linear through oneDNN's linear for float32 CPU inference) against the float64 product, and
where it falls back to F.linear: a gradient wanted, another dtype, T2T_ONEDNN=0, oneDNN off in torch, torch.compile,
torch.jit.trace. The training pairs' oneDNN products (forward and input gradient) at the end. The tests turn oneDNN
on with T2T_ONEDNN=1 (its default is off on Intel CPUs); the default itself, in Python and C++, at the end."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from float64_checks import assert_close_to
from t2t_kernels.ops._onednn import (ONEDNN_ENV, ONEDNN_LINEAR_REGISTERED, intel_cpu, linear, onednn_linear_applies,
                                     onednn_wanted)

ONEDNN_OP = "mkldnn::_linear_pointwise"
# max error / max(1, max |reference|): a dot product of up to 300 fp32 terms with random signs rounds by ~sqrt(K) u
# relative to the terms' scale (measured <= 2.6e-7 here); 128 u as the other fp32 suites
TOLERANCE = 128 * 2.0**-24

needs_onednn = pytest.mark.skipif(not (ONEDNN_LINEAR_REGISTERED and torch.backends.mkldnn.is_available()),
                                  reason="torch here has no oneDNN linear (mkldnn::_linear_pointwise)")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """oneDNN on whatever the CPU (tests that need it off set T2T_ONEDNN=0 themselves)."""
    monkeypatch.setenv(ONEDNN_ENV, "1")


def products(fn):
    """fn()'s result and how many oneDNN linears and ATen products it ran."""
    with torch.profiler.profile() as prof:
        out = fn()
    keys = [event.key for event in prof.events()]
    return out, keys.count(ONEDNN_OP), sum(keys.count(k) for k in ("aten::mm", "aten::addmm", "aten::matmul"))


def make(shape, K, N, bias, generator):
    """x, weight and a bias: dense (bias True or "dense"), None (False), "expanded" (one value, stride 0) or
    "strided" (every other element of a longer tensor): oneDNN reads a bias as dense, so the last two must be copied."""
    x = torch.randn(*shape, K, generator=generator)
    weight = torch.randn(N, K, generator=generator) / K**0.5
    b = {False: None, True: lambda: torch.randn(N, generator=generator),
         "dense": lambda: torch.randn(N, generator=generator),
         "expanded": lambda: torch.randn(1, generator=generator).expand(N),
         "strided": lambda: torch.randn(2 * N, generator=generator)[::2]}[bias]
    return x, weight, b if b is None else b()


# (leading dims, K, N): one row, odd widths (the T2T module's 147 inputs), the backbone's qkv, three leading dims
@needs_onednn
@pytest.mark.parametrize("shape,K,N", [((1,), 5, 3), ((37,), 147, 192), ((2, 197), 384, 1152), ((2, 3, 5), 17, 9)])
@pytest.mark.parametrize("bias", ["dense", False, "expanded", "strided"], ids=lambda b: b or "no-bias")
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "column-slice"])
def test_matches_float64(shape, K, N, bias, layout):
    generator = torch.Generator().manual_seed(K * N + len(shape))
    x, weight, b = make(shape, K, N, bias, generator)
    if layout == "transposed":  # same values, rows not contiguous
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "column-slice":  # rows of a wider tensor
        x = torch.cat([x, torch.randn(*shape, 3, generator=generator)], -1)[..., :K]
    with torch.inference_mode():
        out, onednn, aten = products(lambda: linear(x, weight, b))
    assert (onednn, aten) == (1, 0)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert_close_to(out, want, TOLERANCE, f"{layout} {shape} {K}->{N}")


def test_empty_reduction_takes_f_linear():
    """x's last dimension 0 (oneDNN has no primitive for it): F.linear, the bias broadcast."""
    x, weight, b = torch.randn(4, 0), torch.randn(3, 0), torch.randn(3)
    assert not onednn_linear_applies(x)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight, b), b.expand(4, 3), rtol=0, atol=0)


@needs_onednn
@pytest.mark.parametrize("bias", ["expanded", "strided"])
@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_cpp_pairs_read_a_bias_of_any_layout(kind, bias):
    """The C++ LayerNorm/GELU -> Linear ops under no_grad (their oneDNN product) with a bias that is not dense."""
    ops = torch.ops.t2t_kernels
    if not hasattr(ops, "norm_linear"):
        pytest.skip("the extension has no norm_linear/gelu_linear ops")
    generator = torch.Generator().manual_seed(5)
    x, weight, b = make((3, 11), 24, 40, bias, generator)
    norm_w, norm_b = torch.randn(24, generator=generator), torch.randn(24, generator=generator)
    with torch.no_grad():
        if kind == "layer_norm":
            out, onednn, _ = products(lambda: ops.norm_linear(x, norm_w, norm_b, [24], 1e-5, weight, b))
            act = F.layer_norm(x.double(), (24,), norm_w.double(), norm_b.double(), 1e-5)
        else:
            out, onednn, _ = products(lambda: ops.gelu_linear(x, weight, b))
            act = F.gelu(x.double())
    assert onednn == 1
    assert_close_to(out, F.linear(act, weight.double(), b.double()), TOLERANCE, f"{kind} {bias} bias")


@needs_onednn
def test_no_grad_mode_suffices():
    """Outside inference mode, with no tensor wanting a gradient (nn.Module parameters under torch.no_grad)."""
    generator = torch.Generator().manual_seed(1)
    x, weight, b = make((9,), 16, 8, True, generator)
    with torch.no_grad():
        out, onednn, _ = products(lambda: linear(x, weight.requires_grad_(), b))
    assert onednn == 1 and not out.requires_grad
    assert_close_to(out, F.linear(x.double(), weight.double(), b.double()), TOLERANCE, "no_grad")


@needs_onednn
def test_forward_mode_tangent_is_kept():
    """A dual input (forward-mode AD) takes F.linear, whose tangent is the product's: oneDNN's op has none."""
    generator = torch.Generator().manual_seed(4)
    x, weight, b = make((5,), 12, 6, True, generator)
    tangent = torch.randn(x.shape, generator=generator)
    with torch.no_grad():
        out, jvp = torch.func.jvp(lambda t: linear(t, weight, b), (x,), (tangent,))
    torch.testing.assert_close(jvp, F.linear(tangent, weight), rtol=0, atol=0)
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=0, atol=0)


def test_cpu_autocast_keeps_f_linear():
    """Under CPU autocast F.linear computes in the autocast dtype: so does linear() (bitwise the same result)."""
    generator = torch.Generator().manual_seed(5)
    x, weight, b = make((7,), 24, 10, True, generator)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_linear_applies(x)
        out, want = linear(x, weight, b), F.linear(x, weight, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["grad", "float64", "env", "mkldnn-off", "mixed-dtypes"])
def test_falls_back_to_f_linear(case, monkeypatch):
    """Where oneDNN does not apply the result is F.linear's (bitwise; with its gradient where one is wanted, its
    error where the dtypes differ)."""
    generator = torch.Generator().manual_seed(2)
    x, weight, b = make((11,), 13, 7, True, generator)
    if case == "float64":
        x, weight, b = x.double(), weight.double(), b.double()
    if case == "grad":
        weight.requires_grad_()
    if case == "env":
        monkeypatch.setenv(ONEDNN_ENV, "0")
    if case == "mkldnn-off":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    if case == "mixed-dtypes":
        weight = weight.double()
        with pytest.raises(RuntimeError, match="dtype"):
            linear(x, weight, b)
        return
    assert not onednn_linear_applies(x) or case == "grad"
    out, onednn, aten = products(lambda: linear(x, weight, b))
    assert onednn == 0 and aten >= 1
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=0, atol=0)
    if case == "grad":
        out.sum().backward()
        torch.testing.assert_close(weight.grad, x.sum(0).expand(7, -1))  # d sum(x W^T) / dW


def test_compiled_leaves_the_product_to_inductor():
    """Under torch.compile the helper traces as F.linear (fullgraph: no break on the environment lookup)."""
    generator = torch.Generator().manual_seed(3)
    x, weight, b = make((6,), 8, 5, True, generator)
    torch._dynamo.reset()
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        out = compiled(x, weight, b)
    assert_close_to(out, F.linear(x.double(), weight.double(), b.double()), TOLERANCE, "compiled")


def test_jit_trace_records_f_linear():
    """torch.jit.trace cannot record oneDNN's op (its optional-scalar list argument): traced, the helper is F.linear,
    and the trace replays it on another input."""
    generator = torch.Generator().manual_seed(4)
    x, weight, b = make((6,), 8, 5, True, generator)
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: linear(t, weight, b), x)
        fresh = torch.randn(9, 8, generator=generator)
        torch.testing.assert_close(traced(fresh), F.linear(fresh, weight, b), rtol=0, atol=0)
    assert "aten::linear" in {node.kind() for node in traced.graph.nodes()}


@needs_onednn
@pytest.mark.parametrize("cpp", [True, False], ids=["cpp-op", "python-function"])
@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_training_pairs_take_onednn_for_the_product_and_the_input_gradient(kind, cpp, monkeypatch):
    """The lean LayerNorm/GELU -> Linear pairs of training (layers/recompute.py: the C++ autograd ops, or the Python
    Function without them) run their forward product and their input's gradient (g W = linear(g, W^T)) through
    oneDNN in float32, the weight's gradient through ATen; all within fp32 rounding of float64. ATen's products
    instead under T2T_ONEDNN=0, CPU autocast, and in a double backward's differentiable backward."""
    from t2t_kernels.layers import recompute

    if cpp and not recompute._HAS_CPP_PAIRS:
        pytest.skip("the extension has no norm_linear/gelu_linear ops")
    monkeypatch.setattr(recompute, "_HAS_CPP_PAIRS", cpp)
    torch.manual_seed(0)
    norm, fc = torch.nn.LayerNorm(96), torch.nn.Linear(96, 160)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    params = [*norm.parameters(), *fc.parameters()] if kind == "layer_norm" else [*fc.parameters()]
    x = (torch.randn(3, 37, 96) * 2 + 0.5).requires_grad_()
    grad_out = torch.randn(3, 37, 160)

    def pair(x, norm, fc):
        return recompute.norm_linear(norm, fc, x) if kind == "layer_norm" else recompute.gelu_linear(fc, x)

    def step():
        out = pair(x, norm, fc)
        return out, torch.autograd.grad(out, [x, *params], grad_out)

    (out, grads), onednn, aten = products(step)
    assert onednn == 2 and aten >= 1  # forward and input gradient; the weight's gradient
    norm64, fc64 = copy.deepcopy(norm).double(), copy.deepcopy(fc).double()
    x64 = x.detach().double().requires_grad_()
    params64 = [*norm64.parameters(), *fc64.parameters()] if kind == "layer_norm" else [*fc64.parameters()]
    act = norm64(x64) if kind == "layer_norm" else F.gelu(x64)
    want = fc64(act)
    want_grads = torch.autograd.grad(want, [x64, *params64], grad_out.double())
    assert_close_to(out, want, TOLERANCE, "out")
    for i, (g, w) in enumerate(zip(grads, want_grads)):  # sums over 111 rows or 160 outputs
        assert_close_to(g, w, TOLERANCE, f"gradient {i}")

    monkeypatch.setenv(ONEDNN_ENV, "0")
    assert products(step)[1] == 0
    monkeypatch.setenv(ONEDNN_ENV, "1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert products(step)[1] == 0

    def double_backward():
        out = pair(x, norm, fc)
        (gx,) = torch.autograd.grad(out, [x], grad_out, create_graph=True)
        return gx.square().sum().backward()

    assert products(double_backward)[1] == 1  # the forward product only


def vendor_from_cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except OSError:
        return None


@pytest.mark.parametrize("value", [None, "", "0", "1"], ids=["unset", "empty", "off", "on"])
def test_default_is_off_on_intel_cpus_only(value, monkeypatch):
    """T2T_ONEDNN unset or empty: oneDNN except on an Intel CPU (MKL's GEMMs are the faster there); "0" off, "1" on."""
    if value is None:
        monkeypatch.delenv(ONEDNN_ENV)
    else:
        monkeypatch.setenv(ONEDNN_ENV, value)
    vendor = vendor_from_cpuinfo()
    if vendor is not None:
        assert intel_cpu() == (vendor == "GenuineIntel"), vendor
    assert onednn_wanted() == {"0": False, "1": True}.get(value or "", not intel_cpu())


@needs_onednn
@pytest.mark.parametrize("value", [None, "0", "1"], ids=["unset", "off", "on"])
def test_cpp_ops_follow_the_python_default(value, monkeypatch):
    """The extension decides for itself (csrc/cpu/onednn_linear.h asks the CPU its vendor): its post_attention wide
    path takes oneDNN exactly where the Python side's linear() does, with T2T_ONEDNN unset, off and on."""
    from t2t_kernels.ops import POST_ATTENTION_BACKENDS, post_attention

    reason = POST_ATTENTION_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    if value is None:
        monkeypatch.delenv(ONEDNN_ENV)
    else:
        monkeypatch.setenv(ONEDNN_ENV, value)
    assert os.environ.get(ONEDNN_ENV) == value
    generator = torch.Generator().manual_seed(6)
    M, D, E, H = 40, 24, 20, 7000  # weights above post_attention's wide bound: whole-matrix products
    y, skip = torch.randn(M, D, generator=generator), torch.randn(M, E, generator=generator)
    params = [torch.randn(E, D, generator=generator) / D**0.5, torch.randn(E, generator=generator),
              torch.ones(E), torch.zeros(E), torch.randn(H, E, generator=generator) / E**0.5,
              torch.randn(H, generator=generator), torch.randn(E, H, generator=generator) / H**0.5,
              torch.randn(E, generator=generator)]
    with torch.inference_mode():
        _, cpp_onednn, _ = products(lambda: post_attention(y, skip, *params, backend="cpp"))
        _, python_onednn, _ = products(lambda: linear(y, params[0], params[1]))
    assert python_onednn == int(onednn_linear_applies(y))
    assert cpp_onednn == 3 * python_onednn
