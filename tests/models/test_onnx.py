"""torch.onnx.export (the dynamo exporter) of the fused model: "auto" runs the ops' eager formulas while the exporter
traces (ONNX has their ops, not the kernels), so the graph holds standard ONNX ops only, and onnxruntime reproduces
the PyTorch model's logits on non-square images with a dynamic batch."""
import pytest
import torch

from t2t_kernels import T2TViT

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

IMG = (32, 48)


def _model(tokens_type, backend="auto"):
    torch.manual_seed(0)
    return T2TViT(img_size=IMG, tokens_type=tokens_type, num_classes=10, embed_dim=64, depth=2, num_heads=2,
                  mlp_ratio=2.0, backend=backend).eval()


def _export(model, path):
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(model, (torch.randn(2, 3, *IMG),), dynamo=True, dynamic_shapes=({0: batch},),
                                verbose=False)
    program.save(str(path))


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_onnxruntime_matches_the_fused_model(tokens_type, tmp_path):
    model = _model(tokens_type)
    path = tmp_path / "t2t.onnx"
    _export(model, path)
    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains in the graph: {domains}"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 5):  # another batch than the traced one
        x = torch.randn(batch, 3, *IMG)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

