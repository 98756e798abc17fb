"""Loading official T2T-ViT checkpoints (and plain or safetensors state dicts) without running code from them."""
from __future__ import annotations

import argparse
import math
import os
import pickle
import zipfile
import zlib

import torch
import torch.nn.functional as F
from torch import nn

_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP wrappers, torch.compile's OptimizedModule
_RENAMES = (("patch_embed.", "tokens_to_token."),)  # timm's port of the model
_HEAD_KEYS = ("head.weight", "head.bias")


class CheckpointError(RuntimeError):
    """The file cannot be read as a checkpoint, or its weights do not fit the model."""


def _checkpoint_path(path) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist or is not a file")
    return path


def _is_safetensors(path: str) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then the JSON header's '{'."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


def _verify_zip_checksums(path: str) -> None:
    """torch.load does not check the CRC-32 that torch.save writes for each zip member, so flipped bytes in tensor
    data would load as wrong weights without a word. Checks them (files written with CRC-32 off store 0: skipped)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as member:  # raises BadZipFile on a CRC mismatch once read to the end
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise CheckpointError(f"checkpoint {path!r} is corrupt (damaged download or disk?): {err}") from err


def _unpickling_detail(err: Exception) -> str:
    """torch's weights-only error without its boilerplate about the PyTorch 2.6 default change."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(boiler)]
    return " ".join(lines) or str(err).splitlines()[0]


def read_checkpoint(path) -> dict:
    """The raw object of a checkpoint file: torch.load(weights_only=True) or safetensors; never unpickles code.

    Every way the file can be unreadable (missing, truncated, corrupt, not a checkpoint) raises FileNotFoundError or
    CheckpointError with the path and the reason; objects that would need code to rebuild are refused."""
    path = _checkpoint_path(path)
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise CheckpointError(f"reading {path!r} needs the safetensors package ({err})") from err
        try:
            return load_file(path, device="cpu")
        except Exception as err:
            raise CheckpointError(f"could not read safetensors checkpoint {path!r} (truncated or corrupt?): {err}") from err
    _verify_zip_checksums(path)
    try:
        # timm's CheckpointSaver (which wrote the official files) stores the training args as an argparse.Namespace:
        # a plain attribute holder, safe to rebuild, so it is the one class allowed beyond tensors and containers
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickling_detail(err)
        if "GLOBAL" in detail or "global" in detail:  # a class or function the file wants to import and call
            raise CheckpointError(
                f"refused to load {path!r}: it holds objects other than tensors and plain containers, and loading "
                f"them could run code from the file (torch.load(weights_only=True) said: {detail})"
            ) from err
        raise CheckpointError(
            f"could not read checkpoint {path!r} (truncated or corrupt, or not a file written by torch.save?): {detail}"
        ) from err
    except Exception as err:  # miniz, struct, KeyError, UnicodeDecodeError ...: whatever the parser met, it is corrupt
        raise CheckpointError(
            f"could not read checkpoint {path!r} (truncated or corrupt, or not a file written by torch.save?): "
            f"{type(err).__name__}: {err}"
        ) from err


def extract_state_dict(obj, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint: state_dict_ema (if use_ema and present), state_dict, model,
    or the object itself when it already maps names to tensors. Keys lose `module.` and timm's `patch_embed.`."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    order = ("state_dict_ema", "state_dict", "model") if use_ema else ("state_dict", "model")
    state = next((obj[k] for k in order if isinstance(obj.get(k), dict) and obj[k]), obj)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            "no state dict found in the checkpoint: expected a dict of tensors or one under 'state_dict_ema', "
            f"'state_dict' or 'model'; top-level keys: {sorted(map(str, obj))[:20]}"
        )
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        cleaned[key] = value
    return cleaned


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None):
    """(1, 1 + h0*w0, E) -> (1, 1 + h*w, E): bicubic on the token grid, the cls position kept as it is."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise CheckpointError(f"pos_embed must be (1, 1 + N, E), got {tuple(pos_embed.shape)}")
    n_old = pos_embed.shape[1] - 1
    if old_grid is not None and (not isinstance(old_grid, (tuple, list)) or len(old_grid) != 2 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in old_grid)):
        raise TypeError(f"old_grid must be a pair of positive ints (h, w), got {old_grid!r}")
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise CheckpointError(f"pos_embed has {n_old} grid tokens, not a square grid; pass the "
                                  "checkpoint's token grid as old_grid=(h, w)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_old:
        raise CheckpointError(f"old_grid {old_grid} does not match the {n_old} grid tokens of pos_embed")
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    E = pos_embed.shape[-1]
    grid = grid.float().reshape(1, *old_grid, E).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], E).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)


def adapt_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                     old_grid: tuple[int, int] | None = None) -> tuple[dict, set]:
    """Fits a checkpoint to the model: drops a head of another size (or the model's head when the checkpoint has
    none: a backbone), resizes pos_embed to the model's grid (the checkpoint's token grid is old_grid, square when
    None), and raises on any other shape mismatch. Returns the state dict and the keys it dropped on purpose."""
    own = model.state_dict()
    state, dropped = dict(state), set()
    head_differs = any(k in state and (k not in own or own[k].shape != state[k].shape) for k in _HEAD_KEYS) or (
        not any(k in state for k in _HEAD_KEYS) and any(k in own for k in _HEAD_KEYS))
    if head_differs:
        dropped = {k for k in _HEAD_KEYS if k in state or k in own}
        for k in _HEAD_KEYS:
            state.pop(k, None)
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        if state["pos_embed"].shape[-1] != own["pos_embed"].shape[-1]:
            raise CheckpointError(
                f"pos_embed width {state['pos_embed'].shape[-1]} does not match the model's embed_dim "
                f"{own['pos_embed'].shape[-1]}: the checkpoint is for another variant"
            )
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.tokens_to_token.grid_size, old_grid)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError("checkpoint tensors do not fit the model (another variant?):\n  " + "\n  ".join(mismatched))
    return state, dropped


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel and torch.compile, whose state dicts prefix its keys."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def load_pretrained(model: nn.Module, path, use_ema: bool = True, strict: bool = True,
                    old_grid: tuple[int, int] | None = None):
    """Load an official T2T-ViT checkpoint (.pth.tar with state_dict / state_dict_ema, keys with or without
    `module.` or `_orig_mod.`, timm's `patch_embed.` naming), a plain state dict, or a .safetensors file into
    ``model`` (or the model inside DDP or torch.compile).

    The head is dropped (and stays freshly initialised) when num_classes differs or the checkpoint has none;
    pos_embed is resized for another image size. A checkpoint trained at a non-square size needs its token grid,
    old_grid=(H // 16, W // 16) of that size (the file does not record it; None: square). The file is read with
    weights_only=True, so no code from it runs. With strict=True, missing or unexpected keys raise an error that
    lists them. Returns (missing_keys, unexpected_keys).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained: model must be an nn.Module (a T2TViT), got {type(model).__name__}")
    model = _unwrapped(model)
    state = extract_state_dict(read_checkpoint(path), use_ema=use_ema)
    own = model.state_dict()
    if not own.keys() & state.keys():
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} shares no key with the model: it is not a T2T-ViT checkpoint "
            f"(its first keys: {sorted(state)[:6]}; the model's: {list(own)[:6]})"
        )
    state, dropped = adapt_state_dict(model, state, old_grid)
    # every check before the first copy: a load that raises leaves the model as it was, not half loaded
    missing = [k for k in own if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not match the model:\n  missing keys: {missing}\n"
            f"  unexpected keys: {unexpected}"
        )
    result = model.load_state_dict(state, strict=False)
    return [k for k in result.missing_keys if k not in dropped], list(result.unexpected_keys)
