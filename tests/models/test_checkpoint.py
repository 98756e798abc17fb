import argparse
import os

import pytest
import torch

import t2t_kernels
from t2t_kernels import load_pretrained
from t2t_kernels.models.checkpoint import CheckpointError, resize_pos_embed


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def _official_file(tmp_path, state, ema, **extra):
    """What timm's CheckpointSaver wrote for the official release: DDP `module.` keys, EMA weights, args."""
    ckpt = {"epoch": 309, "arch": "t2t_vit_7", "version": 2, "metric": 71.7,
            "args": argparse.Namespace(model="t2t_vit_7", lr=5e-4, img_size=224),
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "state_dict_ema": {f"module.{k}": v for k, v in ema.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]}, **extra}
    path = tmp_path / "t2t_vit_7.pth.tar"
    torch.save(ckpt, path)
    return path


@pytest.fixture
def source():
    return _randomised(t2t_kernels.t2t_vit_7(img_size=32)).eval()


def test_official_format_round_trip_prefers_ema(tmp_path, source):
    ema = {k: v + 1 for k, v in source.state_dict().items()}
    path = _official_file(tmp_path, source.state_dict(), ema)
    target = t2t_kernels.t2t_vit_7(img_size=32)
    assert load_pretrained(target, path) == ([], [])
    for k, v in target.state_dict().items():
        assert torch.equal(v, ema[k]), k
    load_pretrained(target, path, use_ema=False)
    for k, v in target.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source(x))


def test_factory_pretrained_path_and_timm_naming(tmp_path, source):
    renamed = {k.replace("tokens_to_token.", "patch_embed."): v for k, v in source.state_dict().items()}
    path = tmp_path / "timm_port.pth"
    torch.save(renamed, path)
    model = t2t_kernels.t2t_vit_7(pretrained=str(path), img_size=32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


def test_other_num_classes_drops_head(tmp_path, source):
    path = _official_file(tmp_path, source.state_dict(), source.state_dict())
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)
    fresh_head = model.head.weight.clone()
    assert load_pretrained(model, path) == ([], [])
    assert torch.equal(model.head.weight, fresh_head)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    headless = t2t_kernels.t2t_vit_7(img_size=32, num_classes=0)
    load_pretrained(headless, path)
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(headless.eval()(x), source.forward_features(x))


def test_other_image_size_resizes_pos_embed(tmp_path, source):
    path = _official_file(tmp_path, source.state_dict(), source.state_dict())
    for img in (64, (48, 80)):
        model = t2t_kernels.t2t_vit_7(img_size=img)
        load_pretrained(model, path)
        h, w = model.tokens_to_token.grid_size
        assert model.pos_embed.shape == (1, 1 + h * w, 256)
        assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # cls position kept
        expected = torch.nn.functional.interpolate(
            source.pos_embed[:, 1:].reshape(1, 2, 2, 256).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
            align_corners=False).permute(0, 2, 3, 1).reshape(1, h * w, 256)
        torch.testing.assert_close(model.pos_embed[:, 1:], expected)


def test_backbone_checkpoint_loads_into_a_model_with_a_head(tmp_path, source):
    """A num_classes=0 checkpoint (a backbone) into a classifier: strict load, the fresh head kept."""
    backbone = t2t_kernels.t2t_vit_7(img_size=32, num_classes=0)
    backbone.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("head.")})
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)
    fresh_head = model.head.weight.clone()
    assert load_pretrained(model, path) == ([], [])
    assert torch.equal(model.head.weight, fresh_head)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert t2t_kernels.t2t_vit_7(pretrained=str(path), img_size=32, num_classes=10) is not None


def test_non_square_checkpoint_grid(tmp_path):
    """A checkpoint trained at (32, 64) (a 2 x 4 token grid): its grid named by old_grid, resized as that grid."""
    source = _randomised(t2t_kernels.t2t_vit_7(img_size=(32, 64)))
    path = tmp_path / "wide.pth"
    torch.save(source.state_dict(), path)
    model = t2t_kernels.t2t_vit_7(img_size=64)
    with pytest.raises(CheckpointError, match="old_grid"):  # 8 grid tokens: not square, so not guessed
        load_pretrained(model, path)
    assert load_pretrained(model, path, old_grid=(2, 4)) == ([], [])
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(source.pos_embed, (4, 4), old_grid=(2, 4)))
    expected = torch.nn.functional.interpolate(
        source.pos_embed[:, 1:].reshape(1, 2, 4, 256).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
        align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 256)
    torch.testing.assert_close(model.pos_embed[:, 1:], expected)
    with pytest.raises(TypeError, match="old_grid must be a pair of positive ints"):
        load_pretrained(model, path, old_grid=8)


def test_state_of_a_compiled_or_wrapped_model(tmp_path, source):
    """torch.compile's `_orig_mod.` keys load, and into a compiled model too (its T2TViT gets the weights)."""
    path = tmp_path / "compiled.pth"
    torch.save({f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    model = t2t_kernels.t2t_vit_7(img_size=32)
    assert load_pretrained(model, path) == ([], [])
    compiled = torch.compile(t2t_kernels.t2t_vit_7(img_size=32))  # not run: only its wrapper matters
    assert load_pretrained(compiled, path) == ([], [])
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
        assert torch.equal(compiled._orig_mod.state_dict()[k], v), k


def test_resize_pos_embed_same_grid_is_identity_and_errors():
    pos = torch.randn(1, 1 + 12, 8)
    torch.testing.assert_close(resize_pos_embed(pos, (3, 4), old_grid=(3, 4)), pos)
    with pytest.raises(CheckpointError, match="square"):
        resize_pos_embed(pos, (4, 4))
    with pytest.raises(CheckpointError, match="old_grid"):
        resize_pos_embed(pos, (4, 4), old_grid=(2, 5))
    with pytest.raises(CheckpointError, match=r"pos_embed must be \(1, 1 \+ N, E\), got \(13, 8\)"):
        resize_pos_embed(pos[0], (4, 4))


def test_safetensors(tmp_path, source):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = t2t_kernels.t2t_vit_7(img_size=32)
    load_pretrained(model, path)
    assert torch.equal(model.cls_token, source.cls_token)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"cls_token": torch.zeros(1)}, "payload": exploit}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_pretrained(t2t_kernels.t2t_vit_7(img_size=32), path)
    assert not marker.exists()


def test_bad_checkpoints(tmp_path, source):
    model = t2t_kernels.t2t_vit_7(img_size=32)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained(model, tmp_path / "missing.pth")
    good = _official_file(tmp_path, source.state_dict(), source.state_dict())
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(model, truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_pretrained(model, garbage)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.ones(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="must be a dict"):
        load_pretrained(model, not_a_dict)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.6.")}
    partial["extra.weight"] = torch.ones(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"(?s)missing keys: \['blocks\.6\..*unexpected keys: \['extra\.weight'\]"):
        load_pretrained(model, tmp_path / "partial.pth")
    missing, unexpected = load_pretrained(model, tmp_path / "partial.pth", strict=False)
    assert len(missing) == 11 and unexpected == ["extra.weight"]
    torch.save(t2t_kernels.t2t_vit_14(img_size=32).state_dict(), tmp_path / "other_variant.pth")
    with pytest.raises(CheckpointError, match="another variant"):
        load_pretrained(model, tmp_path / "other_variant.pth")
