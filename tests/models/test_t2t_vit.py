import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
from official_forward import official_forward
from perturb import perturbed

import t2t_kernels
from t2t_kernels import T2TViT, create_model, list_models
from t2t_kernels.layers.common import Attention
from t2t_kernels.layers.t2t import TokenAttention
from t2t_kernels.models.t2t_vit import VARIANTS, get_sinusoid_encoding
from t2t_kernels.ops._onednn import ONEDNN_ENV

# DESIGN §3: total parameters (incl. pos_embed and Performer w) at 224, in millions
PARAM_TOTALS_M = {
    "t2t_vit_7": 4.31, "t2t_vit_10": 5.89, "t2t_vit_12": 6.94, "t2t_vit_14": 21.55, "t2t_vit_19": 39.18,
    "t2t_vit_24": 64.11, "t2t_vit_t_14": 21.54, "t2t_vit_t_19": 39.17, "t2t_vit_t_24": 64.10,
    "t2t_vit_14_resnext": 21.55, "t2t_vit_14_wide": 25.16,
}


def expected_shapes(name, img=224, num_classes=1000):
    """The official state-dict keys and shapes, written out from the architecture description (DESIGN §3)."""
    tokens_type, E, depth, heads, mlp_ratio = VARIANTS[name]
    n = (img // 16) ** 2
    shapes = {"cls_token": (1, 1, E), "pos_embed": (1, n + 1, E), "tokens_to_token.project.weight": (E, 576),
              "tokens_to_token.project.bias": (E,), "norm.weight": (E,), "norm.bias": (E,),
              "head.weight": (num_classes, E), "head.bias": (num_classes,)}
    for i, dim in ((1, 147), (2, 576)):
        p = f"tokens_to_token.attention{i}"
        if tokens_type == "performer":
            layer = {"kqv.weight": (192, dim), "kqv.bias": (192,), "proj.weight": (64, 64), "proj.bias": (64,),
                     "norm1.weight": (dim,), "norm1.bias": (dim,), "norm2.weight": (64,), "norm2.bias": (64,),
                     "mlp.0.weight": (64, 64), "mlp.0.bias": (64,), "mlp.2.weight": (64, 64), "mlp.2.bias": (64,),
                     "w": (32, 64)}
        else:
            layer = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (192, dim),
                     "attn.proj.weight": (64, 64), "attn.proj.bias": (64,), "norm2.weight": (64,),
                     "norm2.bias": (64,), "mlp.fc1.weight": (64, 64), "mlp.fc1.bias": (64,),
                     "mlp.fc2.weight": (64, 64), "mlp.fc2.bias": (64,)}
        shapes.update({f"{p}.{k}": v for k, v in layer.items()})
    hidden = int(E * mlp_ratio)
    for b in range(depth):
        block = {"norm1.weight": (E,), "norm1.bias": (E,), "attn.qkv.weight": (3 * E, E),
                 "attn.proj.weight": (E, E), "attn.proj.bias": (E,), "norm2.weight": (E,), "norm2.bias": (E,),
                 "mlp.fc1.weight": (hidden, E), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (E, hidden),
                 "mlp.fc2.bias": (E,)}
        shapes.update({f"blocks.{b}.{k}": v for k, v in block.items()})
    return shapes


@pytest.mark.parametrize("name", list(PARAM_TOTALS_M))
def test_parameter_totals_and_state_dict_layout(name):
    model = create_model(name)
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e6, 2) == PARAM_TOTALS_M[name]
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(name)


def test_list_models_and_factories():
    assert list_models() == list(PARAM_TOTALS_M)
    for name in list_models():
        assert getattr(t2t_kernels, name).__name__ == name


def test_fixed_parameters_and_init():
    model = t2t_kernels.t2t_vit_7()
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed, get_sinusoid_encoding(197, 256), rtol=0, atol=0)
    pos = model.pos_embed[0]
    assert pos[3, 4] == pytest.approx(math.sin(3 / 10000 ** (4 / 256)), abs=1e-6)
    assert pos[3, 5] == pytest.approx(math.cos(3 / 10000 ** (4 / 256)), abs=1e-6)
    for layer in (model.tokens_to_token.attention1, model.tokens_to_token.attention2):
        assert not layer.w.requires_grad
        m = layer.w.shape[0]
        # orthogonal rows scaled by sqrt(m): w w^T = m I
        torch.testing.assert_close(layer.w @ layer.w.T, m * torch.eye(m), atol=1e-4, rtol=0)
        # the model-level init re-initialises the Performer's Linears: std .02, zero bias
        assert layer.kqv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.count_nonzero(layer.kqv.bias) == 0
    assert model.norm.weight.eq(1).all() and model.norm.bias.eq(0).all()
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)


def test_qk_scales():
    t = t2t_kernels.t2t_vit_t_14()
    # Token_transformer scales by the input width (147, 576), not by in_dim = 64
    assert t.tokens_to_token.attention1.attn.scale == 147**-0.5
    assert t.tokens_to_token.attention2.attn.scale == 576**-0.5
    assert t.blocks[0].attn.scale == (384 // 6) ** -0.5
    assert t2t_kernels.t2t_vit_14(qk_scale=384**-0.5).blocks[0].attn.scale == 384**-0.5


@pytest.mark.parametrize("name,img", [("t2t_vit_7", 64), ("t2t_vit_t_14", 64), ("t2t_vit_14_resnext", 48),
                                      ("t2t_vit_7", (48, 80)), ("t2t_vit_12", 224)])
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_matches_official_forward(name, img, backend):
    model = perturbed(create_model(name, img_size=img, backend=backend), 0.05).eval()
    size = (img, img) if isinstance(img, int) else img
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(x)
        ref = official_forward(model.state_dict(), x, VARIANTS[name][0], VARIANTS[name][3])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("img,tokens", [(224, 196), (384, 576), ((224, 320), 280)])
def test_forward_shapes(img, tokens):
    model = t2t_kernels.t2t_vit_7(img_size=img, num_classes=10).eval()
    size = (img, img) if isinstance(img, int) else img
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert model.forward_tokens(x).shape == (1, tokens + 1, 256)
        assert model.forward_features(x).shape == (1, 256)
        assert model(x).shape == (1, 10)


def test_eval_is_deterministic_and_train_uses_dropout():
    model = t2t_kernels.t2t_vit_7(img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()  # the Performer's hard-coded Dropout(0.1) is active in training
        assert not torch.equal(model(x), model(x))


def test_timm_style_helpers():
    model = t2t_kernels.t2t_vit_7(img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() == {"cls_token"}
    assert model.default_cfg["input_size"] == (3, 32, 32) and model.default_cfg["classifier"] == "head"
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.default_cfg["num_classes"] == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    model.reset_classifier(np.int64(3), global_pool="token")
    assert model(x).shape == (2, 3) and type(model.num_classes) is int


def test_numpy_numbers_are_accepted():
    """Sizes and rates from a numpy config (np.int64, np.float32) build the same model as Python's numbers."""
    torch.manual_seed(0)
    ours = t2t_kernels.t2t_vit_7(img_size=np.int64(32), num_classes=np.int64(4), drop_path_rate=np.float32(0.1))
    torch.manual_seed(0)
    plain = t2t_kernels.t2t_vit_7(img_size=32, num_classes=4, drop_path_rate=0.1)
    assert ours.img_size == (32, 32) and all(type(s) is int for s in ours.img_size)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))


def test_drop_path_rate_one_drops_every_residual_branch():
    """drop_path_rate=1 (the last block's rate): that block's branches are all dropped, not NaN (x / 0 * 0)."""
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=3, drop_path_rate=1.0).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    block = model.blocks[-1]  # rate 1: its output is its input
    tokens = torch.randn(2, 5, 256)
    assert torch.equal(block(tokens), tokens)


@pytest.mark.parametrize("norm_layer", [partial(torch.nn.LayerNorm, elementwise_affine=False),
                                        partial(torch.nn.LayerNorm, bias=False)], ids=["no-affine", "no-bias"])
def test_norm_layer_without_affine_parameters(norm_layer):
    """A LayerNorm without weight or bias builds (init skips what is not there) and agrees across backends."""
    torch.manual_seed(0)
    fused = t2t_kernels.t2t_vit_7(img_size=32, norm_layer=norm_layer).eval()
    eager = t2t_kernels.t2t_vit_7(img_size=32, norm_layer=norm_layer, backend="eager").eval()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-5)


# the first T2T layer's norm1 and kqv weight: without checkpointing (lean pairs) their gradients come from the
# normalised tokens (layers/recompute.py, _grads_of_affine_input: the image needs no gradient), with it from the
# plain modules' chain: other roundings of the same sums
AFFINE_INPUT_GRADS = ("tokens_to_token.attention1.kqv.weight", "tokens_to_token.attention1.norm1.weight",
                      "tokens_to_token.attention1.norm1.bias")


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    # the same GEMMs on both sides: by default the lean pairs' float32 CPU products go through oneDNN, the checkpointed
    # plain modules' through MKL (other roundings; the pairs against float64: test_backends_agree, test_recompute)
    monkeypatch.setenv(ONEDNN_ENV, "0")
    torch.manual_seed(0)
    model = perturbed(t2t_kernels.t2t_vit_7(img_size=32), 0.05).eval()  # eval: no dropout randomness
    x = torch.randn(2, 3, 32, 32)

    def grads(model, x):
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    truth = grads(copy.deepcopy(model).double(), x.double())
    plain = grads(model, x)
    model.set_grad_checkpointing(True)
    checkpointed = grads(model, x)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for n in plain:
        if n not in AFFINE_INPUT_GRADS:
            torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
            continue
        # as close to float64 as each other (measured: 1.6e-6 and 1.8e-6 of the largest, on kqv.weight)
        scale = truth[n].abs().max().item()
        errors = [(g.double() - truth[n]).abs().max().item() / scale for g in (plain[n], checkpointed[n])]
        assert max(errors) <= 1e-5 and max(errors) <= 2 * min(errors) + 1e-7, (n, errors)


def test_set_backend_reaches_every_layer():
    model = t2t_kernels.t2t_vit_7(img_size=32)
    model.set_backend("eager")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"eager"}
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cudnn")


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=100), "multiples of 16"),
    (dict(img_size=(224, 200)), "multiples of 16"),
    (dict(img_size="224"), "img_size"),
    (dict(tokens_type="convolution"), "tokens_type"),
    (dict(backend="fast"), "backend"),
    (dict(num_classes=-1), "num_classes"),
    (dict(embed_dim=250, num_heads=4), "divisible"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        T2TViT(**{"embed_dim": 64, "depth": 1, "num_heads": 4, **kwargs})


@pytest.mark.parametrize("build,match", [
    (lambda: Attention(dim=250, num_heads=4), r"Attention: dim 250 must be divisible by num_heads 4"),
    (lambda: TokenAttention(dim=147, in_dim=250, num_heads=4),
     r"TokenAttention: in_dim 250 must be divisible by num_heads 4"),
])
def test_layers_built_alone_reject_indivisible_heads(build, match):
    """The layers are public (official class names): built directly, not through T2TViT's checks, they still say
    which sizes do not divide."""
    with pytest.raises(ValueError, match=match):
        build()


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown model 't2t_vit_99'.*t2t_vit_14"):
        create_model("t2t_vit_99")
    with pytest.raises(ValueError, match="local checkpoint"):
        create_model("t2t_vit_7", pretrained=True)


@pytest.mark.parametrize("shape,match", [
    ((3, 32, 32), r"\(B, C, H, W\)"),
    ((1, 1, 32, 32), "in_chans=3"),
    ((1, 3, 48, 48), r"img_size=\(32, 32\)"),
])
def test_bad_forward_inputs(shape, match):
    model = t2t_kernels.t2t_vit_7(img_size=32)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))
