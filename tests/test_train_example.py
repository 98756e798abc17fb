import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_example", os.path.join(ROOT, "examples", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_example_runs_saves_and_resumes(tmp_path, train_script, capsys):
    ckpt = str(tmp_path / "ckpt.pt")
    common = ["--img-size", "32", "--batch-size", "16", "--checkpoint", ckpt, "--no-progress", "--epochs", "2"]
    accuracy = train_script.main(common + ["--max-steps", "3"])
    assert 0.0 <= accuracy <= 1.0
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and state["epoch"] == 0
    train_script.main(common + ["--resume", ckpt, "--max-steps", "5"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "final val accuracy" in out
    assert torch.load(ckpt, weights_only=True)["step"] == 5


def test_train_example_compiled(tmp_path, train_script, capsys):
    """--compile trains and evaluates through torch.compile; the checkpoint keeps the model's own keys (no
    _orig_mod. prefix), so an eager run resumes from it."""
    ckpt = str(tmp_path / "ckpt.pt")
    common = ["--img-size", "32", "--batch-size", "16", "--checkpoint", ckpt, "--no-progress", "--epochs", "2"]
    torch._dynamo.reset()
    accuracy = train_script.main(common + ["--compile", "default", "--max-steps", "2"])
    assert 0.0 <= accuracy <= 1.0
    keys = torch.load(ckpt, weights_only=True)["model"].keys()
    assert "cls_token" in keys and not any(k.startswith("_orig_mod.") for k in keys)
    train_script.main(common + ["--resume", ckpt, "--max-steps", "3"])
    assert "resumed from" in capsys.readouterr().out


def test_train_example_image_folder(tmp_path, train_script, capsys):
    """--data DIR trains on an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*) of images of any size: the
    number of classes comes from its folders."""
    pytest.importorskip("torchvision")
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 6), ("val", 3)):
        for label in ("cat", "dog", "fox"):
            os.makedirs(tmp_path / "data" / split / label)
            for i in range(per_class):
                h, w = torch.randint(24, 60, (2,), generator=generator).tolist()
                pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(tmp_path / "data" / split / label / f"{i}.png")
    ckpt = str(tmp_path / "ckpt.pt")
    accuracy = train_script.main(["--data", str(tmp_path / "data"), "--img-size", "32", "--batch-size", "4",
                                  "--checkpoint", ckpt, "--no-progress", "--epochs", "1"])
    assert 0.0 <= accuracy <= 1.0
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4  # 18 training images in batches of 4, the last partial one dropped
    assert state["model"]["head.weight"].shape[0] == 3
    assert "(3 classes, chance 0.333)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--batch-size 32 is larger than the training set \(18 images\)"):
        train_script.main(["--data", str(tmp_path / "data"), "--img-size", "32", "--batch-size", "32",
                           "--checkpoint", ckpt, "--no-progress"])


def test_warmup_cosine_schedule(train_script):
    f = train_script.warmup_cosine
    assert f(0, 100, 10) == pytest.approx(0.1)
    assert f(9, 100, 10) == pytest.approx(1.0)
    assert f(10, 100, 10) == pytest.approx(1.0)
    assert f(55, 100, 10) == pytest.approx(0.5)
    assert f(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("args,match", [
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--batch-size", "-2"], "argument --batch-size: must be at least 1, got -2"),
    (["--backend", "fast"], "argument --backend: invalid choice: 'fast'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: no CUDA device is available")]))
def test_train_example_rejects_bad_arguments(train_script, args, match, capsys):
    """Argument errors before any work (--epochs 0 had "trained" zero steps and reported chance accuracy)."""
    with pytest.raises(SystemExit) as exit_:
        train_script.main(args + ["--no-progress"])
    assert exit_.value.code == 2 and match in capsys.readouterr().err
