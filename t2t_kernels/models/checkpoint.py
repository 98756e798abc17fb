"""Loading official T2T-ViT checkpoints (and plain or safetensors state dicts) without running code from them."""
from __future__ import annotations

import argparse
import math
import os
import pickle
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

_PREFIXES = ("module.",)  # DataParallel / DDP wrappers
_RENAMES = (("patch_embed.", "tokens_to_token."),)  # timm's port of the model
_HEAD_KEYS = ("head.weight", "head.bias")


class CheckpointError(RuntimeError):
    """The file cannot be read as a checkpoint, or its weights do not fit the model."""


def read_checkpoint(path) -> dict:
    """The raw object of a checkpoint file: torch.load(weights_only=True) or safetensors; never unpickles code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise CheckpointError(f"reading {path!r} needs the safetensors package ({err})") from err
        try:
            return load_file(path, device="cpu")
        except Exception as err:
            raise CheckpointError(f"could not read safetensors checkpoint {path!r}: {err}") from err
    try:
        # timm's CheckpointSaver (which wrote the official files) stores the training args as an argparse.Namespace:
        # a plain attribute holder, safe to rebuild, so it is the one class allowed beyond tensors and containers
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path!r}: it holds objects other than tensors and plain containers, and loading "
            f"them could run code from the file (torch.load(weights_only=True) said: {str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"could not read checkpoint {path!r} (truncated or corrupt?): {err}") from err


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
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise CheckpointError(f"pos_embed has {n_old} grid tokens, not a square grid; pass old_grid=(h, w)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_old:
        raise CheckpointError(f"old_grid {old_grid} does not match the {n_old} grid tokens of pos_embed")
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    E = pos_embed.shape[-1]
    grid = grid.float().reshape(1, *old_grid, E).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], E).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)


def adapt_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, set]:
    """Fits a checkpoint to the model: drops a head of another size, resizes pos_embed to the model's grid, and
    raises on any other shape mismatch. Returns the state dict and the keys it dropped on purpose."""
    own = model.state_dict()
    state, dropped = dict(state), set()
    head_differs = any(k in state and (k not in own or own[k].shape != state[k].shape) for k in _HEAD_KEYS)
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
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.tokens_to_token.grid_size)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError("checkpoint tensors do not fit the model (another variant?):\n  " + "\n  ".join(mismatched))
    return state, dropped


def load_pretrained(model: nn.Module, path, use_ema: bool = True, strict: bool = True):
    """Load an official T2T-ViT checkpoint (.pth.tar with state_dict / state_dict_ema, keys with or without
    `module.`, timm's `patch_embed.` naming), a plain state dict, or a .safetensors file into ``model``.

    The head is dropped (and stays freshly initialised) when num_classes differs; pos_embed is resized for another
    image size. The file is read with weights_only=True, so no code from it runs. With strict=True, missing or
    unexpected keys raise an error that lists them. Returns (missing_keys, unexpected_keys).
    """
    state = extract_state_dict(read_checkpoint(path), use_ema=use_ema)
    state, dropped = adapt_state_dict(model, state)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in dropped]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not match the model:\n  missing keys: {missing}\n"
            f"  unexpected keys: {list(result.unexpected_keys)}"
        )
    return missing, list(result.unexpected_keys)
