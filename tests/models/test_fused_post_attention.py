"""In inference on the CPU backends, each T2T layer runs its soft split, norm1 and kqv product as one op, each T2T
layer and each backbone block its projection + skip, norm2 and MLP as the fused post_attention op, and each block but
the last (which attends for the class token alone) its attention as the softmax_attention op, the other products
before them as oneDNN linears (issue 5: the T2T module and whole-model forward); wherever an op does not apply
(gradients wanted, dropout active, autocast, the eager backend, a norm or activation other than the official ones,
the official attention formula) the layers run unfused. Either way the logits are the eager model's."""
import pytest
import torch

import t2t_kernels
from op_log import OpLog
from perturb import perturbed
from t2t_kernels.models.t2t_vit import VARIANTS
from t2t_kernels.ops import POST_ATTENTION_BACKENDS
from t2t_kernels.ops._onednn import ONEDNN_ENV, onednn_linear_applies

FUSED = "t2t_kernels::post_attention"
ATTENTION = "t2t_kernels::softmax_attention"
ONEDNN = "mkldnn::_linear_pointwise"
SPLIT_LINEAR = "t2t_kernels::soft_split_layer_norm_linear"
requires_cpp = pytest.mark.skipif(
    POST_ATTENTION_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32) is not None,
    reason="the compiled post_attention is not available")


def _perturbed(model):
    return perturbed(model, 0.02)


def _logged(model, x):
    with OpLog() as log:
        out = model(x)
    return out, log.names


@requires_cpp
@pytest.mark.parametrize("name", t2t_kernels.list_models())
@pytest.mark.parametrize("backend,onednn", [("auto", "1"), ("cpp", "1"), ("auto", "0")],
                         ids=["auto", "cpp", "auto-no-onednn"])
def test_inference_fuses_every_layer_and_matches_eager(name, backend, onednn, monkeypatch):
    """... each T2T layer from its soft split's input to its kqv product as the soft_split_layer_norm_linear op, and
    the other products before the ops (each block's qkv, the T2T module's projection) as oneDNN linears where those
    apply (T2T_ONEDNN=0 turns them off)."""
    monkeypatch.setenv(ONEDNN_ENV, onednn)
    model = _perturbed(t2t_kernels.create_model(name, img_size=32, num_classes=10, backend=backend)).eval()
    x = torch.randn(2, 3, 32, 32)
    depth = len(model.blocks)
    with torch.no_grad():
        out, names = _logged(model, x)
        model.set_backend("eager")
        ref, ref_names = _logged(model, x)
    assert names.count(FUSED) == 2 + depth and FUSED not in ref_names
    # the attending blocks, and the t-variants' two T2T layers (Token_transformer: one head over the tokens)
    t2t_attention = 2 if VARIANTS[name][0] == "transformer" else 0
    assert names.count(ATTENTION) == depth - 1 + t2t_attention and ATTENTION not in ref_names
    assert names.count(SPLIT_LINEAR) == 2 and SPLIT_LINEAR not in ref_names
    # the T2T module's projection, the attending blocks' qkv, the last block's class-token query and keys/values
    assert names.count(ONEDNN) == (2 + depth if onednn_linear_applies(x) else 0) and ONEDNN not in ref_names
    # every norm2 and GELU went into the op: only the blocks' norm1 and the final norm remain
    assert sum(n.startswith("aten::native_layer_norm") for n in names) == depth + 1
    assert not any(n.startswith("aten::gelu") for n in names)
    assert sum(n.startswith("aten::native_layer_norm") for n in ref_names) == 2 * depth + 1 + 4  # + the T2T layers'
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@requires_cpp
def test_backbone_inference_at_full_width_matches_eager():
    """T2T-ViT-14's blocks at their real width (E=384, H=1152: the kernel's wide path, whole-matrix GEMMs) on 197
    tokens, against the eager blocks."""
    model = _perturbed(t2t_kernels.t2t_vit_14(img_size=32, num_classes=10)).eval()
    blocks, tokens = torch.nn.Sequential(*model.blocks[:2]), torch.randn(2, 197, 384)
    with torch.no_grad():
        out, names = _logged(blocks, tokens)
        model.set_backend("eager")
        ref = blocks(tokens)
    assert names.count(FUSED) == 2 and names.count(ATTENTION) == 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@requires_cpp
def test_float64_inference_uses_the_float64_kernel():
    model = _perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out, names = _logged(model, x)
        model.set_backend("eager")
        ref = model(x)
    assert names.count(FUSED) == 2 + len(model.blocks)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def _fused_count(model, x, op=FUSED, **autocast):
    with OpLog() as log:
        if autocast:
            with torch.autocast("cpu", **autocast):
                model(x)
        else:
            model(x)
    return log.names.count(op)


@requires_cpp
def test_attention_unfused_where_the_op_does_not_apply():
    """The blocks attend through softmax_attention on the CPU: in inference (where post_attention fuses, and under
    autocast, where it does not) and in float32 training (the op's backward kernel), unless the layers' own attention
    is asked for: the official formula (set_fused_attn(False)) or attention dropout in training; and not in bf16
    training (the kernel's backward takes float32/float64)."""
    model = _perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    attending = len(model.blocks) - 1  # the last block attends for the class token alone
    assert _fused_count(model.train(), x, ATTENTION) == attending  # gradients wanted: the backward kernel
    assert _fused_count(model.train(), x, ATTENTION, dtype=torch.bfloat16) == 0
    model.blocks[0].attn.attn_drop = 0.1
    assert _fused_count(model.train(), x, ATTENTION) == attending - 1
    model.blocks[0].attn.attn_drop = 0.0
    with torch.no_grad():
        assert _fused_count(model.eval(), x, ATTENTION) == attending
        assert _fused_count(model.train(), x, ATTENTION) == attending  # no dropout anywhere by default
        model.blocks[0].attn.attn_drop = 0.1
        assert _fused_count(model.train(), x, ATTENTION) == attending - 1
        assert _fused_count(model.eval(), x, ATTENTION) == attending
        model.set_fused_attn(False)
        assert _fused_count(model, x, ATTENTION) == 0
        model.set_fused_attn(True)
        assert _fused_count(model, x, ATTENTION, dtype=torch.bfloat16) == attending  # autocast: the op on bf16
        model.set_backend("eager")
        assert _fused_count(model, x, ATTENTION) == 0


@requires_cpp
@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_unfused_where_the_op_does_not_apply(tokens_type):
    name = "t2t_vit_7" if tokens_type == "performer" else "t2t_vit_t_14"
    model = t2t_kernels.create_model(name, img_size=32, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    layers = 2 + len(model.blocks)
    assert _fused_count(model.train(), x) == 0  # gradients wanted
    with torch.no_grad():
        # training without dropout: the blocks (drop rates 0 by default) fuse
        t2t_fused = 0 if tokens_type == "performer" else 2  # the Performer's dropouts are the official hard-coded 0.1
        assert _fused_count(model.train(), x) == layers - 2 + t2t_fused
        model.blocks[0].drop_path = t2t_kernels.layers.common.DropPath(0.1)
        model.blocks[1].mlp.drop.p = 0.1
        assert _fused_count(model.train(), x) == layers - 4 + t2t_fused  # dropout active
        assert _fused_count(model.eval(), x) == layers
        assert _fused_count(model.eval(), x, dtype=torch.bfloat16) == 0  # autocast: mixed dtypes
        model.set_backend("eager")
        assert _fused_count(model, x) == 0
    model.set_backend("auto")
    assert _fused_count(model.eval(), x) == 0  # eval, but the parameters want gradients


@requires_cpp
@pytest.mark.parametrize("change", ["rmsnorm", "tanh_gelu"])
def test_other_norm2_or_activation_runs_unfused(change):
    """A layer whose norm2 is not a LayerNorm, or whose GELU is the tanh one, keeps its own modules."""
    model = _perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)).eval()
    t2t = model.tokens_to_token
    for layer, mlp in ((t2t.attention1, t2t.attention1.mlp), (t2t.attention2, t2t.attention2.mlp),
                       *((block, block.mlp) for block in model.blocks)):
        if change == "rmsnorm":
            layer.norm2 = torch.nn.RMSNorm(layer.norm2.normalized_shape)
        elif isinstance(mlp, torch.nn.Sequential):
            mlp[1] = torch.nn.GELU(approximate="tanh")
        else:
            mlp.act = torch.nn.GELU(approximate="tanh")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, names = _logged(model, x)
        model.set_backend("eager")
        ref = model(x)
    assert FUSED not in names
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@requires_cpp
def test_compiled_inference_keeps_the_fused_op():
    """torch.compile(fullgraph=True) of the inference forward: one graph, no recompile on the next call, and the
    graph calls the fused op (dynamo traces the fuses_post_attention conditions)."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)).eval()
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                out = compiled(x)
    assert len(graphs) == 1
    assert sum("post_attention" in str(node.target) for node in graphs[0].graph.nodes) == 2 + len(model.blocks)
    assert sum("softmax_attention" in str(node.target) for node in graphs[0].graph.nodes) == len(model.blocks) - 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@requires_cpp
@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_inference_peak_is_without_the_tokens(tokens_type):
    """A fused T2T layer's normalised tokens never reach memory (soft_split_layer_norm_linear forms its kqv product
    from the image): the T2T module's peak is stage 1's projection, attention output and layer output (a lower peak
    also keeps glibc from handing the heap back to the OS after every call)."""
    from t2t_kernels.bench.runner import measure_memory

    B, H, W = 2, 64, 64
    module = t2t_kernels.layers.T2T_module(img_size=(H, W), tokens_type=tokens_type, embed_dim=32).eval()
    x = torch.randn(B, 3, H, W)
    with torch.no_grad():
        assert _fused_count(module, x) == 2
        peak, _ = measure_memory(lambda: module(x), x.device)
    rows, f32 = B * (H // 4) * (W // 4), 4
    tokens, projected, attended, out = (rows * width * f32 for width in (3 * 7 * 7, 3 * 64, 64, 64))
    assert projected + attended + out <= peak < tokens + projected + attended + out
