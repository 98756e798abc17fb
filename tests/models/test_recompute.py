"""Training keeps f's input, not its output, for the layers' LayerNorm -> Linear, GELU -> Linear and soft split +
norm -> kqv Linear pairs (t2t_kernels/layers/recompute.py): the same outputs and gradients as the plain modules, and
fewer saved activations (counted through saved_tensors_hooks: no timing, no allocator)."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

import t2t_kernels
from float64_checks import assert_close_to
from op_log import OpLog
from t2t_kernels.layers import Block, T2T_module, recompute
from t2t_kernels.layers.common import maybe_checkpoint, mlp_after_fc1
from t2t_kernels.layers.recompute import _LinearOfRecomputed, gelu_linear, linear_of_recomputed, norm_linear
from t2t_kernels.layers.t2t import SoftSplit
from t2t_kernels.ops import SOFT_SPLIT_LAYER_NORM_BACKENDS
from t2t_kernels.ops._onednn import ONEDNN_ENV

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
HAS_CPP_PAIRS = recompute._HAS_CPP_PAIRS


@pytest.fixture(params=["cpp", "python"])
def pairs(request, monkeypatch):
    """Runs a test with the LayerNorm/GELU pairs on the C++ autograd ops (csrc/recompute.cpp, the default with the
    extension) and on the Python Function (without it)."""
    if request.param == "cpp" and not HAS_CPP_PAIRS:
        pytest.skip("the extension has no norm_linear/gelu_linear ops")
    monkeypatch.setattr(recompute, "_HAS_CPP_PAIRS", request.param == "cpp")
    return request.param


def saved_activation_bytes(fn, module):
    """Bytes of the distinct storages autograd saves while fn() runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _cases(dtype):
    """(name, f's module or None, the lean call, the plain call, input) for each pair kind."""
    norm = torch.nn.LayerNorm(37).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    linear = torch.nn.Linear(37, 29).to(dtype)
    no_bias = torch.nn.Linear(53, 29, bias=False).to(dtype)
    bare_norm = torch.nn.LayerNorm(53, elementwise_affine=False).to(dtype)
    split = SoftSplit(3, 2, 1, backend="auto")
    split_norm = torch.nn.LayerNorm(5 * 9).to(dtype)
    kqv = torch.nn.Linear(5 * 9, 24).to(dtype)
    return [
        ("layer_norm", lambda x: norm_linear(norm, linear, x), lambda x: linear(norm(x)), torch.randn(3, 11, 37)),
        ("layer_norm_no_affine_no_bias", lambda x: norm_linear(bare_norm, no_bias, x),
         lambda x: no_bias(bare_norm(x)), torch.randn(2, 7, 53)),
        ("gelu", lambda x: gelu_linear(linear, x), lambda x: linear(F.gelu(x)), 2 * torch.randn(4, 9, 37)),
        ("soft_split_norm", lambda x: linear_of_recomputed(split.norm_fn(split_norm), kqv, x, split_norm.weight,
                                                           split_norm.bias),
         lambda x: kqv(split(x, norm=split_norm)), torch.randn(2, 5, 9, 7)),
    ], [norm, linear, no_bias, split_norm, kqv]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(4))
def test_same_output_and_gradients_as_the_plain_modules(case, dtype, pairs, monkeypatch):
    monkeypatch.setenv(ONEDNN_ENV, "0")  # the plain Linear's GEMM (MKL) on both sides: the pairs' oneDNN products
    torch.manual_seed(case)              # round otherwise (against float64: test_onednn_linear)
    cases, modules = _cases(dtype)
    name, lean, plain, x0 = cases[case]
    params = [p for m in modules for p in m.parameters()]
    results = []
    for fn in (lean, plain):
        x = x0.to(dtype).requires_grad_()
        out = fn(x)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        grads = torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert torch.equal(out, ref), name  # the forward is the same ops
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None), name
        if r is not None:
            torch.testing.assert_close(g, r, **TOLERANCES[dtype], msg=name)


def test_gradcheck_float64():
    """First derivatives of the Function itself (the layers' wrappers pass module parameters, which gradcheck cannot
    perturb as inputs): with respect to x, the norm's weight and bias and the Linear's weight and bias."""
    torch.manual_seed(0)

    def fn(x, norm_weight, norm_bias, weight, bias):
        return _LinearOfRecomputed.apply(lambda t, a, c: F.layer_norm(t, (6,), a, c, 1e-5), weight, bias, x,
                                         norm_weight, norm_bias)

    shapes = ((2, 3, 6), (6,), (6,), (4, 6), (4,))
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("wanted", ["all", "kqv_weight", "norm_weight", "biases"])
def test_split_norm_pair_without_an_input_gradient(wanted):
    """The image into the first T2T layer needs no gradient: the pair's backward takes the kqv's and norm1's
    gradients from the normalised tokens (recompute._grads_of_affine_input, never forming the tokens' gradient, nor
    calling the split's backward): gradcheck in float64 of the four parameters through it, and in fp32, for each
    subset of them, within 128 units of roundoff of the float64 gradients relative to max(1, their largest), as the
    plain modules' (other roundings of the same sums: not bitwise theirs)."""
    torch.manual_seed(0)
    split = SoftSplit(3, 2, 1, backend="auto")
    image64 = torch.randn(2, 5, 9, 7, dtype=torch.float64)

    def fn(norm_weight, norm_bias, weight, bias, image=image64):
        return _LinearOfRecomputed.apply(split.norm_fn(torch.nn.LayerNorm(45)), weight, bias, image, norm_weight,
                                         norm_bias)

    shapes = ((45,), (45,), (24, 45), (24,))
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    assert torch.autograd.gradcheck(fn, inputs)

    names = ("norm_weight", "norm_bias", "weight", "bias")
    flags = {"all": names, "kqv_weight": ("weight",), "norm_weight": ("norm_weight",),
             "biases": ("norm_bias", "bias")}[wanted]
    params32 = [t.detach().float().requires_grad_(n in flags) for n, t in zip(names, inputs)]
    image = image64.float()
    out = fn(*params32, image=image)
    grad_out = torch.randn_like(out)
    with OpLog() as log:
        grads = torch.autograd.grad(out, [t for t in params32 if t.requires_grad], grad_out)
    assert "t2t_kernels::soft_split_layer_norm_backward" not in log.names, log.names
    norm_weight, norm_bias, weight, bias = params32
    plain = F.linear(F.layer_norm(split(image), (45,), norm_weight, norm_bias, 1e-5), weight, bias)
    plain_grads = torch.autograd.grad(plain, [t for t in params32 if t.requires_grad], grad_out)
    wanted64 = [t for t, t32 in zip(inputs, params32) if t32.requires_grad]
    truth = torch.autograd.grad(fn(*inputs), wanted64, grad_out.double())
    for g, p, t, name in zip(grads, plain_grads, truth, [n for n in names if n in flags]):
        assert_close_to(g, t, 128 * 2.0**-24, name)
        assert_close_to(p, t, 128 * 2.0**-24, f"{name} (plain modules)")


@pytest.mark.parametrize("image_grad", [False, True], ids=["image-no-grad", "image-grad"])
def test_compiled_split_norm_pair_without_an_input_gradient(image_grad):
    """The same saving under torch.compile (aot_eager, fullgraph), where the Function does not trace: an image that
    needs no gradient folds norm1's affine step into the kqv's weight and bias (recompute._linear_of_folded_affine),
    so the compiled backward runs no norm backward and forms no gradient of the normalised tokens; an image that wants
    one keeps the plain pair (whose backward the log then shows). Gradients, the image's too, within 128 units of
    roundoff of float64's relative to max(1, their largest)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    split, norm, linear = SoftSplit(3, 2, 1, backend="auto"), torch.nn.LayerNorm(45), torch.nn.Linear(45, 24)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    image64 = torch.randn(2, 5, 9, 7, dtype=torch.float64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def pair(image):
        return linear_of_recomputed(split.norm_fn(norm), linear, image, norm.weight, norm.bias)

    image = image64.float().requires_grad_(image_grad)
    out = pair(image)
    grad_out = torch.randn_like(out)
    wanted = [norm.weight, norm.bias, linear.weight, linear.bias] + ([image] if image_grad else [])
    with OpLog() as log:
        grads = torch.autograd.grad(out, wanted, grad_out)
    norm_backward = {"aten::native_layer_norm_backward", "t2t_kernels::soft_split_layer_norm_backward"}
    assert bool(norm_backward & set(log.names)) == image_grad, log.names
    wanted64 = [t.detach().double().requires_grad_() for t in wanted]
    norm_weight, norm_bias, weight, bias = wanted64[:4]
    image64 = wanted64[4] if image_grad else image64
    plain = F.linear(F.layer_norm(split(image64), (45,), norm_weight, norm_bias, norm.eps), weight, bias)
    truth = torch.autograd.grad(plain, wanted64, grad_out.double())
    for g, t, name in zip(grads, truth, ("norm_weight", "norm_bias", "weight", "bias", "image")):
        assert_close_to(g, t, 128 * 2.0**-24, name)


@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_gradgradcheck_float64(kind):
    """Double backward (gradient penalties): backward recomputes f from the saved inputs themselves and builds its
    graph when asked to."""
    torch.manual_seed(0)
    f = (lambda t, a, c: F.layer_norm(t, (6,), a, c, 1e-5)) if kind == "layer_norm" else (lambda t: F.gelu(t))

    def fn(x, weight, bias, *f_params):
        return _LinearOfRecomputed.apply(f, weight, bias, x, *f_params)

    shapes = ((2, 3, 6), (4, 6), (4,)) + (((6,), (6,)) if kind == "layer_norm" else ())
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradient_penalty_matches_the_plain_modules(pairs):
    """A double backward through a block's MLP half (x + fc2(gelu(fc1(norm2(x))))): the gradient of |d loss / d x|^2
    through the lean pairs equals the plain modules'. (The attention half has none: torch's CPU flash attention has
    no double backward, in either backend.)"""
    torch.manual_seed(0)
    block = Block(16, 2, mlp_ratio=2).double().train()
    x0 = torch.randn(2, 5, 16, dtype=torch.float64)
    results = []
    for lean in (True, False):
        x = x0.clone().requires_grad_()
        if lean:
            y = x + mlp_after_fc1(block.mlp, norm_linear(block.norm2, block.mlp.fc1, x), training=True)
        else:
            y = x + block.mlp(block.norm2(x))
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [x, *block.norm2.parameters(), *block.mlp.parameters()]))
    for g, r in zip(*results):
        torch.testing.assert_close(g, r, **TOLERANCES[torch.float64])


def test_autocast_bfloat16_matches_the_plain_modules(pairs):
    """Under CPU autocast the Linear runs in bf16 on the cast of f's fp32 output: the recomputation in backward runs
    under the same autocast state, so the gradients are eager's up to the bf16 GEMMs' rounding."""
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(48), torch.nn.Linear(48, 40)
    x0 = torch.randn(2, 30, 48)
    params = [*norm.parameters(), *linear.parameters()]
    results = []
    for fn in (lambda x: norm_linear(norm, linear, x), lambda x: linear(norm(x))):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float().square().sum(), [x, *params])
        results.append((out, grads))
    assert torch.equal(results[0][0], results[1][0])
    for g, r in zip(results[0][1], results[1][1]):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


def _vjp_and_nested(f, f_params_shapes, x0, autocast=False, param_dtype=None):
    """Gradients of linear(f(x)) through f's own backward formula (f.vjp) and through the nested autograd call that
    a plain f takes, from the same inputs; and how many nested autograd calls each made."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(x0.shape[-1], 24).to(torch.float32 if autocast else x0.dtype)
    f_params = [torch.randn(shape, dtype=param_dtype or x0.dtype).requires_grad_() if shape else None
                for shape in f_params_shapes]
    results = []
    for fn in (f, lambda *args: f(*args)):  # the lambda has no .vjp: the nested-autograd path
        x = x0.clone().requires_grad_()
        calls = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = _LinearOfRecomputed.apply(fn, linear.weight, linear.bias, x, *f_params)
        grad = torch.autograd.grad
        torch.autograd.grad = lambda *a, **k: calls.append(1) or grad(*a, **k)
        try:
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
        finally:
            torch.autograd.grad = grad
        tensors = [t for t in (x, linear.weight, linear.bias, *f_params) if t is not None]
        results.append(([t.grad for t in tensors], len(calls)))
        for t in tensors:
            t.grad = None
    return results


@pytest.mark.parametrize("kind", ["layer_norm", "layer_norm_no_affine", "gelu"])
@pytest.mark.parametrize("mode", ["fp32", "bf16_tokens_fp32_params", "autocast_bf16"])
def test_vjp_backward_equals_the_nested_autograd_one(kind, mode):
    """The LayerNorm and GELU pairs backpropagate through f's own formula (native_layer_norm_backward, gelu_backward)
    instead of a nested torch.autograd.grad (host time: found on an H100, where the GPU train step waited for it):
    bitwise the same gradients, in fp32, with bf16 tokens beside fp32 norm parameters, and under autocast."""
    from t2t_kernels.layers.recompute import _gelu, _LayerNormFn

    f, shapes = {"layer_norm": (_LayerNormFn(torch.nn.LayerNorm(40)), [(40,), (40,)]),
                 "layer_norm_no_affine": (_LayerNormFn(torch.nn.LayerNorm(40)), [None, None]),
                 "gelu": (_gelu, [])}[kind]
    x0 = torch.randn(3, 17, 40) * 2 + 0.5
    if mode == "bf16_tokens_fp32_params":
        x0 = x0.bfloat16()
    (vjp_grads, vjp_calls), (nested_grads, nested_calls) = _vjp_and_nested(
        f, shapes, x0, autocast=mode == "autocast_bf16", param_dtype=torch.float32)
    assert vjp_calls == 0 and nested_calls == 1
    for g, r in zip(vjp_grads, nested_grads):
        assert g.dtype == r.dtype and torch.equal(g, r)


def test_vjp_casts_as_autocast_does():
    """_AUTOCAST_LAYER_NORM_FP32 says whether autocast runs layer_norm in fp32 on a device type: CPU's autocast leaves
    it alone (a bf16 input stays bf16), CUDA's registers it (its fp32 list); on a GPU, the cast itself."""
    from t2t_kernels.layers.recompute import _AUTOCAST_LAYER_NORM_FP32

    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_dtype = F.layer_norm(torch.randn(2, 8).bfloat16(), (8,), torch.ones(8), torch.zeros(8)).dtype
    assert _AUTOCAST_LAYER_NORM_FP32["cpu"] == (cpu_dtype == torch.float32) == False  # noqa: E712
    assert _AUTOCAST_LAYER_NORM_FP32["cuda"] == torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::native_layer_norm", "AutocastCUDA")
    if torch.cuda.is_available():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = F.layer_norm(torch.randn(2, 8, device="cuda").bfloat16(), (8,))
        assert (out.dtype == torch.float32) == _AUTOCAST_LAYER_NORM_FP32["cuda"]


def test_vjp_cast_branch_is_the_gradient_of_layer_norm_on_fp32_casts(monkeypatch):
    """Where autocast runs layer_norm in fp32 (CUDA), the vjp casts tokens and parameters as autocast does: exercised
    here on CPU by declaring CPU's autocast so and giving f the casts explicitly; bf16 tokens and parameters."""
    from t2t_kernels.layers import recompute

    monkeypatch.setitem(recompute._AUTOCAST_LAYER_NORM_FP32, "cpu", True)

    def f(x, weight, bias):  # what CUDA's autocast runs for F.layer_norm
        return F.layer_norm(x.float(), (40,), weight.float(), bias.float(), 1e-5)

    f.vjp = recompute._LayerNormFn(torch.nn.LayerNorm(40)).vjp
    x0 = (torch.randn(3, 17, 40) * 2 + 0.5).bfloat16()
    (vjp_grads, vjp_calls), (nested_grads, nested_calls) = _vjp_and_nested(
        f, [(40,), (40,)], x0, autocast=True, param_dtype=torch.bfloat16)
    assert vjp_calls == 0 and nested_calls == 1
    for g, r in zip(vjp_grads, nested_grads):
        assert g.dtype == r.dtype and torch.equal(g, r)


@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_gradcheck_float64_through_the_vjps(kind):
    from t2t_kernels.layers.recompute import _gelu, _LayerNormFn

    torch.manual_seed(0)
    f = _LayerNormFn(torch.nn.LayerNorm(6)) if kind == "layer_norm" else _gelu

    def fn(x, weight, bias, *f_params):
        return _LinearOfRecomputed.apply(f, weight, bias, x, *f_params)

    shapes = ((2, 3, 6), (4, 6), (4,)) + (((6,), (6,)) if kind == "layer_norm" else ())
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    assert torch.autograd.gradcheck(fn, inputs)


def _lean_and_plain_blocks(E):
    """A training Block (width E, 4 heads, hidden 3E) on the default backend, its copy on eager, and tokens
    (2, 50, E) that want a gradient."""
    torch.manual_seed(0)
    block = Block(E, 4, mlp_ratio=3).train()
    plain = copy.deepcopy(block)
    plain.backend = "eager"
    return block, plain, torch.randn(2, 50, E, requires_grad=True)


@pytest.mark.parametrize("attention", ["sdpa", "op"])
def test_a_block_saves_nine_widths_per_token_instead_of_fourteen(pairs, attention, monkeypatch):
    """Eager saves per token x, norm1(x), qkv (3E), the attention output, x2, norm2(x2), fc1's output and the GELU's
    (3E each): 14E. The lean block keeps neither norm output nor the GELU's: 9E (plus SDPA's few floats per head;
    the softmax_attention op keeps qkv alone). With SDPA its output is the plain block's, bitwise; the op's kernel
    rounds differently."""
    if attention == "sdpa":
        monkeypatch.setenv("T2T_EAGER_OPS", "softmax_attention")
    monkeypatch.setenv(ONEDNN_ENV, "0")  # the plain block's GEMMs in the lean pairs too (bitwise comparable)
    E, tokens = 64, 2 * 50
    block, eager, x = _lean_and_plain_blocks(E)
    lean, out = saved_activation_bytes(lambda: block(x), block)
    full, ref = saved_activation_bytes(lambda: eager(x), eager)
    if attention == "sdpa":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    per_token = 4 * E * tokens  # bytes of one width over all tokens (fp32)
    assert 9 * per_token <= lean < 9.5 * per_token, lean / per_token
    assert 14 * per_token <= full < 14.5 * per_token, full / per_token


@pytest.mark.skipif(SOFT_SPLIT_LAYER_NORM_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32)
                    is not None, reason="the compiled soft_split_layer_norm is not available")
@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_t2t_layers_keep_the_image_not_the_normalised_tokens(tokens_type):
    """The T2T module's layers keep the split's image for the kqv Linear, not the normalised tokens (widths 3*7*7 and
    64*3*3 at 32x32: 64 and 16 tokens), which the eager layers save; the outputs agree."""
    torch.manual_seed(0)
    module = _no_dropout(T2T_module(img_size=(32, 32), tokens_type=tokens_type, embed_dim=32)).train()
    eager = copy.deepcopy(module)
    for m in eager.modules():
        if hasattr(m, "backend"):
            m.backend = "eager"
    x = torch.randn(2, 3, 32, 32)
    outputs = []
    for layers in (module, eager):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs.append(layers(x))
        # (B, T, width) or its (B*T, width) view (what F.linear saves of a 3-D input)
        tokens = {s[-1] for s in shapes if (math.prod(s), s[-1]) in ((2 * 64 * 147, 147), (2 * 16 * 576, 576))}
        assert tokens == (set() if layers is module else {147, 576}), tokens
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_whole_model_saves_at_most_three_fifths_of_eager():
    """T2T-ViT-14 at 224x224 (fp32, one image): the fused model's saved activations against the official eager
    model's (measured 0.57: 44.6 vs 78.9 MB per image, 46.7 without the class-token-only last block; the issue's
    GPU target is a peak-memory ratio of 0.6)."""
    torch.manual_seed(0)
    model = _no_dropout(t2t_kernels.t2t_vit_14()).train()
    eager = copy.deepcopy(model)
    eager.set_backend("eager")
    x = torch.randn(1, 3, 224, 224)
    lean, out = saved_activation_bytes(lambda: model(x), model)
    full, ref = saved_activation_bytes(lambda: eager(x), eager)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert lean <= 0.6 * full, lean / full


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_block_keeps_the_lean_saving(compiler):
    """Under torch.compile each pair is a selective activation checkpoint (the Function's backward does not trace):
    the compiled block keeps about 8E per token (measured 8.06E: the graph drops the attention output's copy too)
    where the compiled plain block keeps 13.1E, with the same outputs and gradients. Memory from the allocator
    replay of one forward (CPU)."""
    from t2t_kernels.bench.runner import measure_memory

    E, tokens = 64, 2 * 50
    block, plain, x = _lean_and_plain_blocks(E)
    held, results = {}, []
    for name, layer in (("lean", block), ("plain", plain)):
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend=compiler)
        out = compiled(x)
        results.append((out, torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])))
        held[name] = measure_memory(lambda: compiled(x), x.device, exclude_result=True)[1] / (4 * E * tokens)
    assert held["lean"] < 8.5 and held["plain"] > 12.5, held
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for g, r in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-mode", "aot_eager"])
def test_recompute_pairs_switch_keeps_the_plain_activations(monkeypatch, compiled):
    """T2T_RECOMPUTE_PAIRS=0 (for an A/B of the pairs' time) trains through the plain modules: eager's 14 widths per
    token saved, under torch.compile too (read when the graph is traced), the same outputs."""
    monkeypatch.setenv("T2T_RECOMPUTE_PAIRS", "0")
    E, tokens = 64, 2 * 50
    block, plain, x = _lean_and_plain_blocks(E)
    run = torch.compile(block, fullgraph=True, backend="aot_eager") if compiled else block
    torch._dynamo.reset()
    held, out = saved_activation_bytes(lambda: run(x), block)
    assert held >= 13 * 4 * E * tokens, held / (4 * E * tokens)
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-6)


def test_checkpointed_layers_recompute_only_once():
    """Under gradient checkpointing the whole layer is recomputed in backward: it keeps no lean pairs of its own
    (whose elementwise ops would then run a third time). Block: norm1 and norm2 run twice (forward and the
    checkpoint's recomputation), not three times."""
    block = Block(32, 2, mlp_ratio=2).train()
    x = torch.randn(2, 10, 32, requires_grad=True)
    for enabled, norms in ((True, 2 * 2), (False, 2 * 2)):
        with OpLog() as log:
            maybe_checkpoint(enabled, block, x).sum().backward()
        assert sum(n.startswith("aten::native_layer_norm") and "backward" not in n for n in log.names) == norms


def _pair_op_args(kind, affine=True, dtype=torch.float64):
    """(op, args) for a pair op: x (2, 3, 6), the norm's parameters (6,) or None, weight (4, 6), bias (4,) or None."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    x, weight, bias = t(2, 3, 6), t(4, 6), t(4) if affine else None
    if kind == "gelu":
        return torch.ops.t2t_kernels.gelu_linear.default, (x, weight, bias)
    norm_weight, norm_bias = (t(6), t(6)) if affine else (None, None)
    return torch.ops.t2t_kernels.norm_linear.default, (x, norm_weight, norm_bias, [6], 1e-5, weight, bias)


@pytest.mark.skipif(not HAS_CPP_PAIRS, reason="the extension has no norm_linear/gelu_linear ops")
@pytest.mark.parametrize("affine", [True, False], ids=["params", "no-params"])
@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_cpp_pair_ops_opcheck_gradcheck_gradgradcheck(kind, affine):
    """The C++ autograd ops of the pairs: torch.library.opcheck (schema, autograd registration, fake tensors, AOT
    dispatch), first and second derivatives in float64, with and without the optional parameters."""
    op, args = _pair_op_args(kind, affine)
    torch.library.opcheck(op, args)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def fn(*ts):
        it = iter(ts)
        return op(*(next(it) if isinstance(a, torch.Tensor) else a for a in args))

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.skipif(not HAS_CPP_PAIRS, reason="the extension has no norm_linear/gelu_linear ops")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("mode", ["fp32", "bf16_tokens_fp32_params", "autocast_bf16"])
@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_cpp_pairs_equal_the_python_function_bitwise(kind, mode, device, monkeypatch):
    """The C++ ops are the Python Function op for op (the ops a GPU step's host time was spent in Python for): the
    same outputs and gradients bit for bit, and norm_linear/gelu_linear take them (their grad_fn) by default. On
    CUDA, autocast runs layer_norm in fp32, which both recompute as it did. What eager refuses (CUDA's layer_norm
    takes no fp32 weight for bf16 tokens) both refuse with eager's message."""
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(40).to(device), torch.nn.Linear(40, 24).to(device)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    x0 = torch.randn(3, 17, 40, device=device) * 2 + 0.5
    if mode == "bf16_tokens_fp32_params":  # bf16 tokens into an fp32 norm, its bf16 output into a bf16 Linear
        x0, linear = x0.bfloat16(), linear.bfloat16()
    call = (lambda x: norm_linear(norm, linear, x)) if kind == "layer_norm" else (lambda x: gelu_linear(linear, x))
    params = [*norm.parameters(), *linear.parameters()] if kind == "layer_norm" else [*linear.parameters()]

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "autocast_bf16")

    eager = (lambda x: linear(norm(x))) if kind == "layer_norm" else (lambda x: linear(F.gelu(x)))
    try:
        with autocast():
            eager(x0)
        eager_error = None
    except RuntimeError as err:  # CUDA's layer_norm takes no fp32 weight for bf16 tokens (CPU's does)
        eager_error = str(err).splitlines()[0]
    results = []
    for cpp in (True, False):
        monkeypatch.setattr(recompute, "_HAS_CPP_PAIRS", cpp)
        x = x0.clone().requires_grad_()
        if eager_error is not None:  # both paths refuse what eager refuses, with its message
            with pytest.raises(RuntimeError, match=re.escape(eager_error)), autocast():
                call(x)
            continue
        with autocast():
            out = call(x)
        expected = "GeluLinear" if kind == "gelu" else "NormLinear"
        assert (expected in type(out.grad_fn).__name__ or expected in out.grad_fn.name()) == cpp, out.grad_fn.name()
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
        results.append((out, torch.autograd.grad(out, [x, *params], grad_out)))
    if eager_error is not None:
        return
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and torch.equal(g, r)
