"""torch.hub loads the variants from the repository's hubconf.py."""
import importlib.util
from pathlib import Path

import torch

from t2t_kernels import T2TViT, list_models

REPO = Path(__file__).resolve().parents[1]


def test_hub_lists_every_variant_and_builds_one():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # torch.hub's entry points: the module's public callables
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert entries == set(list_models()) and hubconf.dependencies == ["torch"]
    torch.manual_seed(0)
    model = torch.hub.load(str(REPO), "t2t_vit_7", source="local", img_size=32, num_classes=10)
    assert isinstance(model, T2TViT) and model.num_classes == 10 and model.img_size == (32, 32)
    torch.manual_seed(0)
    expected = T2TViT(img_size=32, num_classes=10, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
