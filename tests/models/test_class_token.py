"""Off the eager backend the model runs its last block for the class token alone (Block.class_token): the head reads
only that row, and the other tokens enter the last block as keys and values. Same logits and gradients as the full
block; hooks on the last block or the final norm switch it off, so they still see every token."""
import pytest
import torch
from torch import nn

import t2t_kernels
from t2t_kernels.layers import Block

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _perturbed(module, scale=0.05):
    with torch.no_grad():  # off the init (zero biases, unit norms), so every parameter matters
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return module


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_block_class_token_is_the_first_row(dtype, qkv_bias, backend, grad):
    # odd sizes: 4 heads of 12, hidden 72, 13 tokens; x a non-contiguous view
    block = _perturbed(Block(48, 4, mlp_ratio=1.5, qkv_bias=qkv_bias, backend=backend).to(dtype)).eval()
    x = torch.randn(48, 13, 3, dtype=dtype).permute(2, 1, 0)
    assert not x.is_contiguous()
    if not grad:
        with torch.no_grad():
            torch.testing.assert_close(block.class_token(x), block(x)[:, :1], **TOLERANCES[dtype])
        return
    x = x.detach().requires_grad_()
    weight = torch.randn(3, 1, 48, dtype=dtype)  # a loss on the class token only

    def grads(run):
        block.zero_grad()
        x.grad = None
        out = run()
        (out * weight).sum().backward()
        return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}

    out, gx, gp = grads(lambda: block.class_token(x))
    ref, ref_gx, ref_gp = grads(lambda: block(x)[:, :1])
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    torch.testing.assert_close(gx, ref_gx, **TOLERANCES[dtype])
    assert gp.keys() == ref_gp.keys()
    for name in ref_gp:
        torch.testing.assert_close(gp[name], ref_gp[name], **TOLERANCES[dtype], msg=name)


def _count_class_token_calls(monkeypatch):
    calls = []
    original = Block.class_token

    def counted(self, x):
        calls.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(Block, "class_token", counted)
    return calls


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_model_runs_the_last_block_for_the_class_token_off_eager(name, monkeypatch):
    calls = _count_class_token_calls(monkeypatch)
    model = _perturbed(t2t_kernels.create_model(name, img_size=32, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert calls == [(2, 5, model.embed_dim)]  # once, on the last block's input (2x2 tokens + class)
        tokens = model.forward_tokens(x)
        assert len(calls) == 1  # forward_tokens returns every token: the full last block
        torch.testing.assert_close(out, model.head(tokens[:, 0]), rtol=1e-5, atol=1e-6)
        model.set_backend("eager")
        ref = model(x)
        assert len(calls) == 1  # eager is the official chain
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["last block", "last attn.qkv", "final norm", "global"])
def test_hooks_see_every_token(where, monkeypatch):
    calls = _count_class_token_calls(monkeypatch)
    model = _perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    assert len(calls) == 1
    seen = []

    def hook(module, args, output):
        seen.append(tuple(output.shape))

    if where == "global":
        handle = nn.modules.module.register_module_forward_hook(hook)
    else:
        watched = {"last block": model.blocks[-1], "last attn.qkv": model.blocks[-1].attn.qkv,
                   "final norm": model.norm}[where]
        handle = watched.register_forward_hook(hook)
    try:
        with torch.no_grad():
            hooked = model(x)
    finally:
        handle.remove()
    assert len(calls) == 1  # not called again
    assert any(shape[:2] == (2, 5) for shape in seen)  # the backbone's tokens, class token and 2x2
    assert not any(len(shape) == 3 and shape[1] == 1 for shape in seen)  # never the class token alone
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model(x)
    assert len(calls) == 2  # hooks removed: the short path again


def test_only_the_official_block_and_norms_take_the_shortcut(monkeypatch):
    """A replaced last block (a subclass may change forward) or a final norm other than LayerNorm (it might mix
    tokens) runs the full path."""
    calls = _count_class_token_calls(monkeypatch)
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)

    class Custom(Block):
        pass

    custom = Custom(256, 4, mlp_ratio=2.0)
    custom.load_state_dict(model.blocks[-1].state_dict())
    with torch.no_grad():
        ref = model(x)
        assert len(calls) == 1
        official, model.blocks[-1] = model.blocks[-1], custom
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
        assert len(calls) == 1
        model.blocks[-1], model.norm = official, nn.Identity()
        model(x)
    assert len(calls) == 1
