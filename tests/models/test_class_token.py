"""Off the eager backend the model runs its last block for the class token alone (Block.class_token): the head reads
only that row, and the other tokens enter the last block as keys and values. Same logits and gradients as the full
block; hooks on the last block or the final norm switch it off, so they still see every token."""
import pytest
import torch
from torch import nn

import t2t_kernels
from perturb import perturbed
from t2t_kernels.layers import Block

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _perturbed(module):
    return perturbed(module, 0.05)


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
    # the backends' logits agree to test_backends_agree's tolerance (the t-variants' T2T attention runs the
    # softmax_attention kernel: 2.6e-6 from a float64 model here, eager's SDPA 1.8e-6, logits up to 2.1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


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
    # a hook also switches off the fused ops of what it watches (every layer's, for a global hook): two fp32 paths,
    # each within 2.4e-6 of a float64 model here (6 seeds; logits up to ~2), compared at test_backends_agree's tolerance
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model(x)
    assert len(calls) == 2  # hooks removed: the short path again


class _LoraLinear(nn.Linear):  # an adapter-style Linear: its forward adds a term the weight does not hold
    def forward(self, x):
        return super().forward(x) + 0.1 * x.flip(-1).repeat(1, 1, 3)


class _CustomBlock(Block):  # a subclass may change forward
    pass


class _TokenMixingNorm(nn.LayerNorm):  # a LayerNorm subclass whose output depends on other tokens
    def forward(self, x):
        return super().forward(x) + x.mean(1, keepdim=True)


def _replace_qkv(model):
    old = model.blocks[-1].attn.qkv
    model.blocks[-1].attn.qkv = _LoraLinear(old.in_features, old.out_features, bias=old.bias is not None)
    model.blocks[-1].attn.qkv.load_state_dict(old.state_dict())


def _replace_block(model):
    custom = _CustomBlock(256, 4, mlp_ratio=2.0)
    custom.load_state_dict(model.blocks[-1].state_dict())
    model.blocks[-1] = custom


def _patch_forward(model):  # as accelerate's offload hooks do: forward set on the instance
    block = model.blocks[-1]
    plain = block.forward
    block.forward = lambda x: plain(x) * torch.linspace(0, 2, x.shape[-1])


def _quantize(model):
    quantize = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)  # deprecated in torch
    if quantize is None:
        pytest.skip("this torch has no torch.ao.quantization.quantize_dynamic")
    return quantize(model, {nn.Linear}, dtype=torch.qint8)  # a Linear whose weight is a method


REPLACEMENTS = {
    "qkv Linear subclass": _replace_qkv,
    "Block subclass": _replace_block,
    "forward set on the block": _patch_forward,
    "block compiled alone": lambda model: model.blocks[-1].compile(backend="eager"),
    "final norm Identity": lambda model: setattr(model, "norm", nn.Identity()),
    "final norm mixing tokens": lambda model: setattr(model, "norm", _TokenMixingNorm(256)),
    "norm2 mixing tokens": lambda model: setattr(model.blocks[-1], "norm2", _TokenMixingNorm(256)),
    "dynamic quantization": _quantize,
}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # torch.ao.quantization's
@pytest.mark.parametrize("change", REPLACEMENTS)
def test_other_modules_in_the_last_block_run_the_full_path(change, monkeypatch):
    """class_token re-implements the official Block, Attention and qkv Linear and needs per-token norms after the
    attention: a subclass, a replaced or patched forward, a separately compiled block, a token-mixing norm or a
    quantized Linear makes the model run the full last block, so the logits stay those of forward_tokens."""
    calls = _count_class_token_calls(monkeypatch)
    model = _perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)).eval()
    model = REPLACEMENTS[change](model) or model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model.head(model.forward_tokens(x)[:, 0]), rtol=1e-5, atol=1e-6)
    assert calls == []
