"""torch.onnx.export (the dynamo exporter) of the fused model: every backend runs the ops' eager formulas while the
exporter traces (ONNX has their ops, not the kernels), so the graph holds standard ONNX ops only, and onnxruntime
reproduces the PyTorch model's logits (on its backend) on non-square images with a dynamic batch."""
import pytest
import torch

from t2t_kernels import T2TViT
from t2t_kernels.ops import PERFORMER_BACKENDS, SOFT_SPLIT_BACKENDS, SOFT_SPLIT_LAYER_NORM_BACKENDS

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


# an explicit kernel backend too (before: its custom op reached the exporter, which has no translation for it)
CASES = [("performer", "auto"), ("transformer", "auto")]
CASES += [("performer", "cpp")] if all(
    "cpp" in b.available("cpu") for b in (SOFT_SPLIT_BACKENDS, PERFORMER_BACKENDS, SOFT_SPLIT_LAYER_NORM_BACKENDS)) else []


@pytest.mark.parametrize("tokens_type,backend", CASES)
def test_onnxruntime_matches_the_fused_model(tokens_type, backend, tmp_path):
    model = _model(tokens_type, backend)
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

