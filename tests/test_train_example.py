import importlib.util
import os

import pytest
import torch
from torch.utils.data import Dataset, Subset

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
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    train_script.main(common + ["--resume", ckpt, "--max-steps", "5"])
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at step 3 of 178" in out and "final val accuracy" in out
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


def make_image_folder(root, splits):
    """root/<split>/<class>/<i>.png: random images of random sizes; splits maps split -> (classes, per class)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, (classes, per_class) in splits.items():
        for label in classes:
            os.makedirs(root / split / label)
            for i in range(per_class):
                h, w = torch.randint(24, 60, (2,), generator=generator).tolist()
                pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")


def test_train_example_image_folder(tmp_path, train_script, capsys):
    """--data DIR trains on an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*) of images of any size: the
    number of classes comes from its folders."""
    pytest.importorskip("torchvision")
    classes = ("cat", "dog", "fox")
    make_image_folder(tmp_path / "data", {"train": (classes, 6), "val": (classes, 3)})
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


def test_train_example_image_folder_class_mismatch(tmp_path, train_script):
    """train/ and val/ each number their own sorted class folders: with val missing "cat", val's "dog" would be
    label 0, train's "cat"; the script refuses before training."""
    pytest.importorskip("torchvision")
    make_image_folder(tmp_path / "data", {"train": (("cat", "dog", "fox"), 1), "val": (("dog", "fox"), 1)})
    with pytest.raises(SystemExit, match=r"val classes \['dog', 'fox'\] differ from train classes "
                                         r"\['cat', 'dog', 'fox'\]"):
        train_script.main(["--data", str(tmp_path / "data"), "--img-size", "16", "--no-progress",
                           "--checkpoint", str(tmp_path / "ckpt.pt")])
    assert not (tmp_path / "ckpt.pt").exists()


def test_warmup_cosine_schedule(train_script):
    f = train_script.warmup_cosine
    assert f(0, 100, 10) == pytest.approx(1 / 11)
    assert f(9, 100, 10) == pytest.approx(10 / 11)
    assert f(10, 100, 10) == pytest.approx(1.0)
    assert f(55, 100, 10) == pytest.approx(0.5)
    assert f(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert f(0, 100, 0) == pytest.approx(1.0)


@pytest.mark.parametrize("total,warmup,peak", [(100, 10, 10), (10, 10, 5), (10, 50, 5), (7, 0, 0), (1, 1, 0)])
def test_warmup_cosine_single_peak_then_decay(train_script, total, warmup, peak):
    """The peak LR at exactly one step (warmup-1 and warmup had both been at 1.0), warmup capped at half the run
    (--epochs 1 with the default --warmup-epochs 1 had warmed up over the whole run and never decayed)."""
    lrs = [train_script.warmup_cosine(s, total, warmup) for s in range(total + 1)]
    assert lrs[peak] == pytest.approx(1.0) and lrs.count(max(lrs)) == 1
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # strictly up to the peak,
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # strictly down after it,
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # to zero after the last step


@pytest.mark.parametrize("args,match", [
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--batch-size", "-2"], "argument --batch-size: must be at least 1, got -2"),
    (["--backend", "fast"], "argument --backend: invalid choice: 'fast'"),
    (["--img-size", "30"], "argument --img-size: must be a positive multiple of 16, got 30"),
    (["--img-size", "0"], "argument --img-size: must be a positive multiple of 16, got 0"),
    (["--data", "/nonexistent"], "argument --data: /nonexistent has no train or val folder"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs: must be at least 0, got -1.0"),
    (["--drop-path", "1"], "argument --drop-path: must be in [0, 1), got 1.0"),
    (["--resume", "/nonexistent.pt"], "argument --resume: no file /nonexistent.pt"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: no CUDA device is available")]))
def test_train_example_rejects_bad_arguments(train_script, args, match, capsys):
    """Argument errors before any work (--epochs 0 had "trained" zero steps and reported chance accuracy;
    --img-size 30 and --data /nonexistent had raised tracebacks, the first one after loading the data)."""
    with pytest.raises(SystemExit) as exit_:
        train_script.main(args + ["--no-progress"])
    assert exit_.value.code == 2 and match in capsys.readouterr().err


@pytest.fixture
def small_digits(train_script, monkeypatch):
    """The script on 96 training and 40 validation digits (fast); returns the list of training indices loaded."""
    loaded = []
    digits_datasets = train_script.digits_datasets

    class Recording(Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return 96

        def __getitem__(self, index):
            loaded.append(index)
            return self.dataset[index]

    def small(img_size, seed=0):
        train, val, num_classes = digits_datasets(img_size, seed)
        return Recording(train), Subset(val, range(40)), num_classes

    monkeypatch.setattr(train_script, "digits_datasets", small)
    return loaded


def final_line(out):
    """The final accuracy line without its timing."""
    line = [line for line in out.splitlines() if line.startswith("final val accuracy")][-1]
    return line.rsplit(" in ", 1)[0]


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, train_script, small_digits, capsys):
    """Stopped mid-epoch twice and resumed, a run ends bitwise where the uninterrupted one does: each epoch's order
    comes from (seed, epoch), the resumed run starts at the exact batch, and the RNG (drop path here) is restored.
    The shuffle order had come from the unsaved global RNG and a partial epoch had been resumed as finished."""
    common = ["--img-size", "16", "--batch-size", "32", "--epochs", "2", "--drop-path", "0.3", "--no-progress"]
    straight, parts = str(tmp_path / "straight.pt"), str(tmp_path / "parts.pt")  # 3 steps per epoch
    accuracy = train_script.main(common + ["--checkpoint", straight])
    expected, straight_loads = final_line(capsys.readouterr().out), list(small_digits)
    del small_digits[:]
    for extra in (["--max-steps", "2"], ["--resume", parts, "--max-steps", "4"], ["--resume", parts]):
        resumed_accuracy = train_script.main(common + ["--checkpoint", parts] + extra)
    out = capsys.readouterr().out
    assert f"resumed from {parts} at step 2 of 6" in out and f"resumed from {parts} at step 4 of 6" in out
    assert small_digits == straight_loads  # the same batches in the same order, none loaded twice
    assert sorted(straight_loads[:96]) == sorted(straight_loads[96:]) == list(range(96))
    assert straight_loads[:96] != straight_loads[96:]  # reshuffled each epoch
    assert resumed_accuracy == accuracy and final_line(out) == expected
    assert expected.endswith("after 6 steps")
    a, b = torch.load(straight, weights_only=True), torch.load(parts, weights_only=True)
    assert a["step"] == b["step"] == 6 and torch.equal(a["rng"], b["rng"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    assert a["scheduler"] == b["scheduler"]


def test_max_steps_with_resume_trains_the_exact_steps(tmp_path, train_script, small_digits, capsys):
    """--max-steps counts all steps, before --resume too, and is checked before a step: resuming at the limit
    trains (and loads) nothing; a run stopped mid-epoch resumes at its next batch, in the epoch the bar shows.
    It had trained one step past the limit and skipped the rest of the interrupted epoch."""
    ckpt = str(tmp_path / "ckpt.pt")
    common = ["--img-size", "16", "--batch-size", "16", "--epochs", "3", "--checkpoint", ckpt]  # 6 steps per epoch
    train_script.main(common + ["--no-progress", "--max-steps", "4"])
    assert torch.load(ckpt, weights_only=True)["step"] == 4 and len(small_digits) == 4 * 16
    assert "epoch 1 (step 4/6): val accuracy" in capsys.readouterr().out

    saved = torch.load(ckpt, weights_only=True)
    train_script.main(common + ["--no-progress", "--resume", ckpt, "--max-steps", "4"])
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at step 4 of 18" in out and "final val accuracy" in out and "after 4 steps" in out
    assert len(small_digits) == 4 * 16  # nothing trained or loaded
    after = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(after["model"][k], v) for k, v in saved["model"].items())

    train_script.main(common + ["--resume", ckpt, "--max-steps", "8"])  # with the progress bar
    captured = capsys.readouterr()
    assert "epoch 1: val accuracy" in captured.out and "epoch 2 (step 2/6): val accuracy" in captured.out
    assert "after 8 steps" in captured.out and torch.load(ckpt, weights_only=True)["step"] == 8
    assert "epoch 1/3" in captured.err and "6/6" in captured.err and "epoch 2/3" in captured.err
    assert len(small_digits) == 8 * 16
    assert sorted(small_digits[:96]) == list(range(96))  # epoch 1: every image once across the two runs


def test_resume_with_float16_scaling_from_a_checkpoint_without(tmp_path, train_script, small_digits, monkeypatch):
    """A checkpoint saved without float16 loss scaling (bf16, or on the CPU) holds an empty GradScaler state, which
    an enabled GradScaler (--amp-dtype float16 on a GPU) had refused to load. The CPU stands in for the GPU here:
    an enabled CPU GradScaler."""
    ckpt = str(tmp_path / "ckpt.pt")
    common = ["--img-size", "16", "--batch-size", "16", "--checkpoint", ckpt, "--no-progress"]
    train_script.main(common + ["--max-steps", "1"])
    assert torch.load(ckpt, weights_only=True)["scaler"] == {}
    grad_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: grad_scaler("cpu", enabled=True))
    train_script.main(common + ["--max-steps", "2", "--resume", ckpt])
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2 and state["scaler"]["scale"] == 2.0 ** 16
