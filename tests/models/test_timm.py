"""timm integration (timm is not a dependency: these tests skip without it): the variants in timm's registry, built
by timm.create_model with its arguments, timm's data config and its features_only wrapper."""
import pytest
import torch

import t2t_kernels
from t2t_kernels.models.t2t_vit import VARIANTS

timm = pytest.importorskip("timm")


def test_every_variant_is_in_timms_registry():
    assert sorted(timm.list_models("t2t_vit*")) == sorted(VARIANTS)


def test_registration_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("T2T_KERNELS_NO_TIMM", "1")
    assert not t2t_kernels.models.register_with_timm()
    monkeypatch.delenv("T2T_KERNELS_NO_TIMM")
    assert t2t_kernels.models.register_with_timm()  # again: the names are registered already, nothing changes
    assert sorted(timm.list_models("t2t_vit*")) == sorted(VARIANTS)


def test_timm_create_model_builds_the_same_model():
    torch.manual_seed(0)
    ours = t2t_kernels.t2t_vit_7(num_classes=5, img_size=(32, 48), drop_path_rate=0.1).eval()
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_7", num_classes=5, img_size=(32, 48), drop_path_rate=0.1).eval()
    assert type(model) is t2t_kernels.T2TViT and model.num_classes == 5
    theirs = model.state_dict()
    assert theirs.keys() == ours.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in ours.state_dict().items())
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(model(x), ours(x), rtol=0, atol=0)


def test_timm_data_config_is_the_official_one():
    model = timm.create_model("t2t_vit_7", img_size=64)
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 64, 64) and config["interpolation"] == "bicubic"
    assert config["crop_pct"] == 0.9 and config["mean"] == (0.485, 0.456, 0.406)
    model = timm.create_model("t2t_vit_7", img_size=64, pretrained_cfg_overlay={"crop_pct": 1.0})
    assert timm.data.resolve_data_config({}, model=model)["crop_pct"] == 1.0
    model.reset_classifier(3)
    assert model.pretrained_cfg["num_classes"] == 3 and model.pretrained_cfg is model.default_cfg


def test_timm_pretrained_is_a_local_checkpoint(tmp_path):
    source = t2t_kernels.t2t_vit_7(num_classes=4, img_size=32)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict_ema": source.state_dict()}, path)
    model = timm.create_model("t2t_vit_7", pretrained=str(path), num_classes=4, img_size=32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="pretrained=True: there is nothing to download"):
        timm.create_model("t2t_vit_7", pretrained=True)
    # timm's way to name a local file for pretrained=True
    model = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                              num_classes=4, img_size=32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_timm_device_and_dtype():
    model = timm.create_model("t2t_vit_7", img_size=32, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


def _has_feature_getter() -> bool:
    try:
        from timm.models._features import FeatureGetterNet  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_feature_getter(), reason="this timm has no FeatureGetterNet (timm 1.0 has it)")
@pytest.mark.parametrize("out_indices", [3, (0, -1)])
def test_timm_features_only_reads_the_blocks(out_indices):
    torch.manual_seed(0)
    model = t2t_kernels.t2t_vit_7(img_size=(32, 64)).eval()
    torch.manual_seed(0)
    features = timm.create_model("t2t_vit_7", img_size=(32, 64), features_only=True, out_indices=out_indices).eval()
    x = torch.randn(2, 3, 32, 64)
    got = features(x)
    want = model.forward_intermediates(x, indices=list(out_indices) if isinstance(out_indices, tuple) else out_indices,
                                       intermediates_only=True)
    assert len(got) == len(want) == (3 if out_indices == 3 else 2)
    for g, w in zip(got, want):
        assert g.shape == (2, 256, 2, 4)
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert features.feature_info.channels() == [256] * len(got)
    assert features.feature_info.reduction() == [16] * len(got)


def test_timm_layer_decay_groups_the_t2t_module_as_the_stem():
    model = timm.create_model("t2t_vit_7", img_size=32, num_classes=3)
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    scales = {n: scale_of[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    depth = len(model.blocks)  # stem 0, blocks 1..depth, head depth + 1: scale 0.5 ** (depth + 1 - layer)
    assert scales["cls_token"] == scales["tokens_to_token.project.weight"] == 0.5 ** (depth + 1)
    assert scales["tokens_to_token.attention1.kqv.weight"] == 0.5 ** (depth + 1)
    assert scales["blocks.0.attn.qkv.weight"] == 0.5 ** depth
    assert scales[f"blocks.{depth - 1}.mlp.fc2.weight"] == scales["norm.weight"] == 0.5
    assert scales["head.weight"] == 1.0


def test_timm_features_only_without_feature_getter_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm.models._features", None)  # what a timm before FeatureGetterNet gives
    with pytest.raises(ImportError, match=f"FeatureGetterNet, which timm {timm.__version__} lacks"):
        timm.create_model("t2t_vit_7", img_size=32, features_only=True)
