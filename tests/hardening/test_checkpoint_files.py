"""Checkpoint files that are not what they claim: truncated, corrupt, not a checkpoint, the wrong shapes, another
architecture, code in the pickle. Each gives FileNotFoundError/TypeError/CheckpointError with the path and the reason,
never runs code, and leaves the model exactly as it was (no half-loaded weights). Plus the formats that must load:
safetensors (by name or by content), the legacy non-zip torch.save format, EMA fallbacks.

(tests/models/test_checkpoint.py covers the official format, the malicious pickle through the zip format, a list, a
partial key set and another variant; these cases are the ones it does not.)
"""
import argparse
import copy
import io
import os
import pickle
import zipfile

import pytest
import torch

import t2t_kernels
from t2t_kernels import T2TViT, load_pretrained
from t2t_kernels.models.checkpoint import CheckpointError, read_checkpoint

IMG = 32
# a small T2T-ViT (Performer T2T module, one block): the loader's logic is the same, files are 100x smaller
TINY = dict(img_size=IMG, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16, num_classes=10)


@pytest.fixture(scope="module")
def source():
    model = T2TViT(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def pristine():
    return T2TViT(**TINY)


@pytest.fixture
def target(pristine):
    return copy.deepcopy(pristine)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a failed load changed {changed[:5]}"


def official_bytes(state, **extra) -> bytes:
    ckpt = {"epoch": 3, "args": argparse.Namespace(model="t2t_vit_7"),
            "state_dict": {f"module.{k}": v for k, v in state.items()}, **extra}
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()


def member_offset(blob: bytes, suffix: str, nth: int = 0) -> int:
    """Where the bytes of the nth zip member whose name ends with `suffix` start."""
    archive = zipfile.ZipFile(io.BytesIO(blob))
    info = [i for i in archive.infolist() if i.filename.endswith(suffix) or suffix in i.filename][nth]
    header = blob[info.header_offset:info.header_offset + 30]
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def flipped(blob: bytes, offset: int, count: int = 16) -> bytes:
    data = bytearray(blob)
    for i in range(offset, offset + count):
        data[i] ^= 0x5A
    return bytes(data)


# name -> function of the good file's bytes giving the bad file's bytes
UNREADABLE = {
    "empty": lambda good: b"",
    "10-bytes": lambda good: good[:10],
    "truncated-10pct": lambda good: good[: len(good) // 10],
    "truncated-half": lambda good: good[: len(good) // 2],
    "truncated-last-byte": lambda good: good[:-1],
    "truncated-central-directory": lambda good: good[:-100],
    "random-bytes": lambda good: os.urandom(4096),
    "text": lambda good: b"state_dict = {}\n" * 100,
    "html-error-page": lambda good: b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    "plain-pickle": lambda good: pickle.dumps({"state_dict": {"cls_token": [0.0]}}),
    "corrupt-pickle": lambda good: flipped(good, member_offset(good, "data.pkl") + 40),
    "corrupt-tensor-bytes": lambda good: flipped(good, member_offset(good, "/data/", 3) + 8),
    "corrupt-last-tensor": lambda good: flipped(good, member_offset(good, "/data/", -1), 4),
    "zip-without-pickle": lambda good: _zip_of({"archive/version": b"3\n"}),
}


def _zip_of(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle: torch.load warns, then refuses
@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_files_give_a_clear_error_and_leave_the_model_alone(name, tmp_path, source, target):
    good = official_bytes(source.state_dict())
    path = tmp_path / f"{name}.pth.tar"
    path.write_bytes(UNREADABLE[name](good))
    before = snapshot(target)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(target, path)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message, message
    assert "could run code" not in message, f"a damaged file is not an attack: {message}"
    assert_unchanged(target, before)


def test_the_good_file_behind_the_damaged_ones_loads(tmp_path, source, target):
    path = tmp_path / "good.pth.tar"
    path.write_bytes(official_bytes(source.state_dict()))
    assert load_pretrained(target, path) == ([], [])
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


NOT_CHECKPOINTS = {
    "str": ("just a string", "must be a dict, got str"),
    "int": (3, "must be a dict, got int"),
    "bare-tensor": (torch.ones(3), "must be a dict, got Tensor"),
    "empty-dict": ({}, "no state dict found"),
    "metadata-only": ({"epoch": 3, "arch": "t2t_vit_7"}, "no state dict found"),
    "state-dict-none": ({"state_dict": None, "epoch": 3}, "no state dict found"),
    "state-dict-of-lists": ({"state_dict": {"cls_token": [0.0, 1.0]}}, "no state dict found"),
    "mixed-values": ({"cls_token": torch.zeros(1, 1, 32), "epoch": 3}, "no state dict found"),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_pickles_that_are_not_checkpoints(name, tmp_path, target):
    obj, fragment = NOT_CHECKPOINTS[name]
    path = tmp_path / f"{name}.pth"
    torch.save(obj, path)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=fragment):
        load_pretrained(target, path)
    assert_unchanged(target, before)


def _with(state, **changes):
    state = dict(state)
    for key, value in changes.items():
        if value is None:
            state.pop(key.replace("__", "."))
        else:
            state[key.replace("__", ".")] = value
    return state


WRONG_SHAPES = {  # key -> the wrong tensor made from the right one
    "blocks.0.mlp.fc1.weight": lambda v: v.t().contiguous(),
    "tokens_to_token.attention1.w": lambda v: v[:4],
    "cls_token": lambda v: v.reshape(-1),
    "tokens_to_token.project.bias": lambda v: v[:-1],
    "blocks.1.norm1.weight": lambda v: torch.tensor(1.0),
    "pos_embed": lambda v: v[..., :16],
}


@pytest.mark.parametrize("key", sorted(WRONG_SHAPES))
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_wrong_tensor_shapes(key, strict, tmp_path, source, target):
    """A tensor of the wrong shape is an error even with strict=False (strict is about key sets), names the key
    and both shapes, and leaves every weight as it was."""
    state = source.state_dict()
    right = tuple(state[key].shape)
    state[key] = WRONG_SHAPES[key](state[key])
    wrong = tuple(state[key].shape)
    torch.save({"state_dict": state}, tmp_path / "shapes.pth")
    before = snapshot(target)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(target, tmp_path / "shapes.pth", strict=strict)
    fragments = ([f"pos_embed width {wrong[-1]}", f"embed_dim {right[-1]}", "another variant"] if key == "pos_embed"
                 else [key, f"checkpoint {wrong}", f"model {right}"])
    assert all(f in str(info.value) for f in fragments), (fragments, str(info.value))
    assert_unchanged(target, before)


def resnet_like_state_dict():
    state = {"conv1.weight": torch.randn(64, 3, 7, 7), "bn1.weight": torch.ones(64), "bn1.bias": torch.zeros(64),
             "bn1.running_mean": torch.zeros(64), "bn1.running_var": torch.ones(64),
             "bn1.num_batches_tracked": torch.tensor(0)}
    for block in range(2):
        for conv in (1, 2):
            state[f"layer1.{block}.conv{conv}.weight"] = torch.randn(64, 64, 3, 3)
            state[f"layer1.{block}.bn{conv}.weight"] = torch.ones(64)
    state.update({"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)})
    return state


@pytest.mark.parametrize("wrapping", ["plain", "official", "safetensors"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_foreign_state_dict(wrapping, strict, tmp_path, target):
    """Another architecture's weights: an error that says so, even with strict=False (loading nothing is never what
    was meant), and the model untouched."""
    state = resnet_like_state_dict()
    if wrapping == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "resnet.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "resnet.pth"
        torch.save(state if wrapping == "plain" else {"state_dict": state, "epoch": 90}, path)
    before = snapshot(target)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(target, path, strict=strict)
    message = str(info.value)
    assert "not a T2T-ViT checkpoint" in message and "conv1.weight" in message and str(path) in message, message
    assert_unchanged(target, before)


def test_strict_key_mismatch_leaves_the_model_alone(tmp_path, source, target):
    """Missing and unexpected keys raise before anything is copied (the loader used to copy the matching tensors
    first, then raise, leaving a half-loaded model behind)."""
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.1.")}
    state["extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "partial.pth")
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_pretrained(target, tmp_path / "partial.pth")
    assert_unchanged(target, before)


LOAD_PRETRAINED_TABLE = [
    ("missing-file", lambda m, d: load_pretrained(m, d / "missing.pth"), FileNotFoundError,
     ["missing.pth", "does not exist"]),
    ("directory", lambda m, d: load_pretrained(m, d), FileNotFoundError, ["not a file"]),
    ("path-none", lambda m, d: load_pretrained(m, None), TypeError, ["checkpoint path", "str or os.PathLike", "NoneType"]),
    ("path-int", lambda m, d: load_pretrained(m, 3.5), TypeError, ["checkpoint path", "float"]),
    ("model-none", lambda m, d: load_pretrained(None, d / "good.pth"), TypeError, ["model", "nn.Module", "NoneType"]),
    ("model-state-dict", lambda m, d: load_pretrained(m.state_dict(), d / "good.pth"), TypeError,
     ["model", "nn.Module"]),
    ("factory-missing-file", lambda m, d: t2t_kernels.t2t_vit_7(pretrained=str(d / "nope.pth"), img_size=IMG, depth=1),
     FileNotFoundError, ["nope.pth"]),
]


@pytest.mark.parametrize("call,error,fragments",
                         [pytest.param(c, e, f, id=n) for n, c, e, f in LOAD_PRETRAINED_TABLE])
def test_load_pretrained_bad_arguments(call, error, fragments, tmp_path, source, target):
    torch.save(source.state_dict(), tmp_path / "good.pth")
    with pytest.raises(error) as info:
        call(target, tmp_path)
    assert all(f in str(info.value) for f in fragments), str(info.value)


# --- code in the file --------------------------------------------------------------------------------------------


class _Exploit:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalExploit:
    marker = None

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("exploit_class", [_Exploit, _EvalExploit], ids=["os.system", "builtins.eval"])
@pytest.mark.parametrize("where", ["legacy-format", "inside-state-dict", "in-args"])
def test_code_in_the_pickle_never_runs(exploit_class, where, tmp_path, target):
    """Beyond tests/models/test_checkpoint.py's zip-format payload: the legacy (non-zip) format, a payload among
    the tensors, a payload where the official files keep their argparse.Namespace (the one allowed class)."""
    marker = tmp_path / "pwned"
    exploit = exploit_class()
    exploit.marker = marker
    state = {k: v for k, v in target.state_dict().items()}
    if where == "inside-state-dict":
        ckpt = {"state_dict": {**state, "blocks.0.norm1.weight": exploit}}
    elif where == "in-args":
        ckpt = {"state_dict": state, "args": argparse.Namespace(model="t2t_vit_7", hook=exploit)}
    else:
        ckpt = {"state_dict": state, "payload": exploit}
    path = tmp_path / "evil.pth.tar"
    torch.save(ckpt, path, _use_new_zipfile_serialization=where != "legacy-format")
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="could run code"):
        load_pretrained(target, path)
    assert not marker.exists()
    assert_unchanged(target, before)


# --- formats that must load --------------------------------------------------------------------------------------


def test_legacy_torch_save_format_loads(tmp_path, source, target):
    path = tmp_path / "legacy.pth.tar"
    path.write_bytes(b"")
    torch.save({"state_dict_ema": source.state_dict(), "state_dict": {}}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert load_pretrained(target, path) == ([], [])
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_empty_ema_falls_back_to_state_dict(tmp_path, source, target):
    torch.save({"state_dict_ema": {}, "state_dict": source.state_dict()}, tmp_path / "ckpt.pth")
    load_pretrained(target, tmp_path / "ckpt.pth")
    assert torch.equal(target.cls_token, source.cls_token)


def test_checkpoint_written_without_crc_still_loads(tmp_path, source, target):
    """torch.save can skip the CRC-32s (stored as 0): the corruption check must not reject such files."""
    path = tmp_path / "nocrc.pth"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(source.state_dict(), path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert all(info.CRC == 0 for info in zipfile.ZipFile(path).infolist() if info.file_size)
    load_pretrained(target, path)
    assert torch.equal(target.cls_token, source.cls_token)


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.bin", "weights.pth"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_safetensors_round_trip(name, prefix, tmp_path, source, target):
    """safetensors files load by name or, under another name, by content; DDP prefixes are stripped; the logits of
    the loaded model equal the source's."""
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({prefix + k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert load_pretrained(target, path) == ([], [])
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source(x))


def test_safetensors_in_bfloat16_loads_the_rounded_values(tmp_path, source, target):
    from safetensors.torch import save_file

    half = {k: v.to(torch.bfloat16).contiguous() for k, v in source.state_dict().items()}
    save_file(half, str(tmp_path / "bf16.safetensors"))
    load_pretrained(target, tmp_path / "bf16.safetensors")
    assert target.cls_token.dtype == torch.float32
    assert torch.equal(target.cls_token, half["cls_token"].float())


@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_damaged_safetensors(damage, tmp_path, source, target):
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in source.state_dict().items()})
    blob = {"truncated": blob[: len(blob) // 2], "header": blob[:8] + b"[" + blob[9:], "empty": b""}[damage]
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="safetensors.*truncated or corrupt"):
        load_pretrained(target, path)
    assert_unchanged(target, before)


def test_read_checkpoint_is_the_raw_object(tmp_path):
    torch.save({"a": torch.ones(2), "meta": {"epoch": 3}}, tmp_path / "x.pth")
    obj = read_checkpoint(tmp_path / "x.pth")
    assert obj["meta"] == {"epoch": 3} and torch.equal(obj["a"], torch.ones(2))
