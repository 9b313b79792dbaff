"""Checkpoints: written atomically (temp file + rename), loaded with torch.load(weights_only=True).

A p2sweep checkpoint is a dict with `format` = "p2sweep/1", `config_yaml` (the TrainingConfig as YAML text, never a
pickled object), `model`, `ema` and `optimizer` state dicts, `images_seen`, `step`, `rng` (tensors only) and
`data_state`. A bare state_dict (as the official trainer saves `model*.pt` / `ema_*.pt`) is also accepted where a
model is loaded.
"""
from __future__ import annotations

import glob
import os
import re
import torch

from .atomic import atomic_write
from .errors import UserError

FORMAT = "p2sweep/1"
_NAME = re.compile(r"ckpt_(\d+)\.pt$")


def atomic_torch_save(obj, path: str) -> str:
    return atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_path(ckpt_dir: str, images_seen: int) -> str:
    return os.path.join(ckpt_dir, f"ckpt_{images_seen:012d}.pt")


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Checkpoints in a directory, oldest first (by the image count in the name)."""
    paths = [p for p in glob.glob(os.path.join(ckpt_dir, "ckpt_*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def latest_checkpoint(ckpt_dir: str) -> str | None:
    paths = list_checkpoints(ckpt_dir)
    return paths[-1] if paths else None


def prune_checkpoints(ckpt_dir: str, keep: int) -> None:
    for p in list_checkpoints(ckpt_dir)[:-keep]:
        os.unlink(p)


def load_file(path: str, map_location="cpu") -> dict:
    """torch.load(weights_only=True) with one-line errors for missing files and non-checkpoints."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for junk input
        msg = str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__
        raise UserError(f"{path}: not a loadable checkpoint ({msg})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a checkpoint (expected a dict, got {type(obj).__name__})")
    return obj


def is_p2sweep_checkpoint(obj: dict) -> bool:
    return obj.get("format") == FORMAT


def weights_from(obj: dict, prefer_ema: bool = True) -> tuple[dict, str]:
    """(state_dict, which) from a p2sweep checkpoint (EMA by default) or a bare official state_dict."""
    if is_p2sweep_checkpoint(obj):
        if prefer_ema and obj.get("ema"):
            return obj["ema"], "ema"
        return obj["model"], "model"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "state_dict"
    raise UserError("not a p2sweep checkpoint or a bare state_dict")
