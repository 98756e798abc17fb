"""torch.compile(fullgraph=True) of the whole model on every backend that runs here: no graph breaks, no
recompiles across steps of one shape, the same logits and gradients as the uncompiled model; torch.export and
torch.jit.trace of the fused model."""
import pytest
import torch

import t2t_kernels
from perturb import perturbed
from t2t_kernels.ops import PERFORMER_BACKENDS, SOFT_SPLIT_BACKENDS


def _cpu_backends():
    usable = set(SOFT_SPLIT_BACKENDS.available("cpu")) & set(PERFORMER_BACKENDS.available("cpu"))
    return [b for b in ("eager", "cpp") if b in usable]


def _cases():
    # aot_eager checks graph capture (fake kernels, autograd) on each backend; one inductor run is enough and
    # costs minutes on 2 cores
    backends = _cpu_backends()
    return [(b, "aot_eager") for b in backends] + [(backends[-1], "inductor")]


@pytest.mark.parametrize("backend,compiler", _cases())
def test_compiled_model_fullgraph_matches_eager(backend, compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    # eval: dropout off; weights off their init (whose identity norms hide the affine terms, e.g. the first T2T
    # layer's norm1 that the compiled pair folds into the kqv)
    model = perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10, backend=backend), 0.02).eval()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    expected.square().sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # a second step of the same shape must reuse the graph
            model.zero_grad()
            out = compiled(x)
            out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for n, g in expected_grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compiled_with_dynamic_shapes(mode):
    """torch.compile(dynamic=True, fullgraph=True): one graph serves three batch sizes (the modules' float
    attributes, e.g. the attention's scale, are symbolic then: the ops' argument checks must trace on them; before,
    softmax_attention's math.isfinite(scale) broke the graph), each with the uncompiled model's logits and
    gradients (train mode with dropout off)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10, backend=_cpu_backends()[-1]), 0.02)
    getattr(model, mode)()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 32, 32)
            results = []
            for run in (compiled, model):
                model.zero_grad()
                out = run(x)
                out.square().sum().backward()
                results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
            (out, grads), (expected, expected_grads) = results
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
            assert grads.keys() == expected_grads.keys()
            for n, g in expected_grads.items():
                torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_on_the_fused_backend(strict):
    """torch.export of the fused model (its custom ops through their fake kernels, the class-token-only last
    block's hook checks traced away) gives a program with the model's logits, at another batch size too."""
    torch.manual_seed(0)
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10, backend=_cpu_backends()[-1]).eval()
    x = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=strict)
    names = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    if _cpu_backends()[-1] == "cpp":
        assert any(name.startswith("t2t_kernels.") for name in names), names
    with torch.no_grad():
        for inputs in (x, torch.randn(3, 3, 32, 32)):
            torch.testing.assert_close(program.module()(inputs), model(inputs), rtol=1e-5, atol=1e-6)


def test_aot_inductor_package_of_the_fused_model(tmp_path):
    """Deployment without Python model code: AOTInductor compiles the exported fused model (dynamic batch) into a
    .pt2 package whose C++ calls the kernels' custom ops (registered by importing t2t_kernels); the loaded package
    gives the model's logits at two batch sizes."""
    torch.manual_seed(0)
    backend = _cpu_backends()[-1]
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10, backend=backend).eval()
    x = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        if backend == "cpp":
            ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
            assert {"t2t_kernels.soft_split_layer_norm_linear.default", "t2t_kernels.performer_attention.default"} <= ops
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "t2t_vit_7.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        for inputs in (x, torch.randn(5, 3, 32, 32)):
            torch.testing.assert_close(runner(inputs), model(inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("factory", ["t2t_vit_7", "t2t_vit_14", "t2t_vit_t_14"])
def test_jit_trace_on_the_fused_backend(factory, grad):
    """torch.jit.trace of the fused model passes the tracer's own check (which traces again under no_grad, so the
    layers' paths must not depend on grad mode while tracing) and its graph gives the model's logits on another
    input and, traced with gradients, the model's parameter gradients. T2T-ViT-14's blocks take post_attention's
    oneDNN path (weights above 1 MB), whose internal op the tracer cannot record on its own."""
    torch.manual_seed(0)
    backend = _cpu_backends()[-1]
    model = getattr(t2t_kernels, factory)(img_size=32, num_classes=10, backend=backend).eval()
    x, fresh = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, x)
        out = traced(fresh)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    if backend == "cpp":
        assert {"t2t_kernels::soft_split", "t2t_kernels::post_attention"} <= kinds, kinds
    expected = model(fresh)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if grad:
        expected.square().sum().backward()
        expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        out.square().sum().backward()
        assert expected_grads
        for n, g in expected_grads.items():
            torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-3, atol=1e-5, msg=n)
