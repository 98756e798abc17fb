"""A model built on the meta device: shapes without memory (forward and backward), then to_empty() and init_weights()
for the constructor's weights, or load_state_dict(assign=True) for given ones (FSDP2's flow: test_distributed)."""
import pytest
import torch

from t2t_kernels import create_model, list_models

IMG = (32, 48)


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return create_model(name, img_size=IMG, num_classes=10, **kwargs)


@pytest.mark.parametrize("name", list_models())
def test_init_weights_draws_what_the_constructor_draws(name):
    torch.manual_seed(7)
    built = create_model(name, img_size=IMG, num_classes=10)
    model = _meta_model(name)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # whatever init_weights leaves unwritten fails the comparison
    torch.manual_seed(7)
    model.init_weights()
    expected = built.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # parameters keep their trainability (the Performer's w and pos_embed stay frozen)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == \
        {n for n, p in built.named_parameters() if not p.requires_grad}


def test_init_weights_redraws_a_trained_model():
    torch.manual_seed(3)
    model = create_model("t2t_vit_7", img_size=IMG, num_classes=10)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.5)  # every value moves
    torch.manual_seed(3)
    model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, initial[key]), key
    torch.manual_seed(4)
    model.init_weights()  # another seed: other draws wherever the constructor draws
    w = model.tokens_to_token.attention1.w
    assert not torch.equal(w, initial["tokens_to_token.attention1.w"])
    torch.testing.assert_close(w @ w.T, w.shape[0] * torch.eye(w.shape[0]), rtol=0, atol=1e-4)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, initial["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
@pytest.mark.parametrize("train", [True, False])
def test_meta_model_gives_shapes(name, backend, train):
    model = _meta_model(name, backend=backend).train(train)
    x = torch.empty(3, 3, *IMG, device="meta")
    logits = model(x)
    assert (logits.device.type, logits.shape, logits.dtype) == ("meta", (3, 10), torch.float32)
    assert model.forward_tokens(x).shape == (3, 1 + (IMG[0] // 16) * (IMG[1] // 16), model.embed_dim)
    if train:
        logits.sum().backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
            assert p.grad is None or (p.grad.device.type, p.grad.shape) == ("meta", p.shape), n


def test_meta_model_takes_given_weights():
    torch.manual_seed(0)
    source = create_model("t2t_vit_7", img_size=IMG, num_classes=10).eval()
    model = _meta_model("t2t_vit_7").eval()
    model.load_state_dict(source.state_dict(), assign=True)
    assert not any(p.is_meta for p in model.parameters())
    assert not model.tokens_to_token.attention1.w.requires_grad and not model.pos_embed.requires_grad
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
