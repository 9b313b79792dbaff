"""Checkpoints: written atomically (temp file + rename), loaded with torch.load(weights_only=True).

A p2sweep checkpoint is a dict with `format` = "p2sweep/1", `config_yaml` (the TrainingConfig as YAML text, never a
pickled object), `model`, `ema` and `optimizer` state dicts, `images_seen`, `step`, `rng` (tensors only) and
`data_state`; with a power-function EMA (`train.ema.type: power`) also `power_ema`, the
`phema.PowerEMA.state_dict()` for an exact resume, while `ema` holds the weights of its evaluated profile (a bare
state_dict like a classic EMA's). A bare state_dict (as the official trainer saves `model*.pt` / `ema_*.pt`) is
also accepted where a model is loaded.

`load_model` is the one way from a checkpoint file to a model: it resolves the config (`resolve_config`), builds
the UNet and loads the weights strictly (`load_checkpoint_weights`, also used by the trainer's --init-from).
"""
from __future__ import annotations

import glob
import os
import re

import torch
import yaml

from .atomic import atomic_write
from .config import TrainingConfig, apply_overrides, config_from_dict, load_config, safe_load_yaml
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


def weights_from(obj: dict, prefer_ema: bool = True, source: str | None = None) -> tuple[dict, str]:
    """(state_dict, which) from a p2sweep checkpoint (EMA by default) or a bare official state_dict; which is
    "ema", "model" or "state_dict". `source` (the file) prefixes the error message."""
    if is_p2sweep_checkpoint(obj):
        if prefer_ema and obj.get("ema"):
            return obj["ema"], "ema"
        return obj["model"], "model"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "state_dict"
    raise UserError(f"{source + ': ' if source else ''}not a p2sweep checkpoint or a bare state_dict")


def load_checkpoint_weights(model: torch.nn.Module, obj: dict, source: str, *, prefer_ema: bool = True) -> str:
    """Load the weights of a loaded checkpoint `obj` (see weights_from) into `model` strictly, with
    `unet.load_weights`'s one-line errors naming `source`; returns which weights were used."""
    from .unet import load_weights  # unet pulls in the model code; checkpoint listing does not need it

    sd, which = weights_from(obj, prefer_ema, source)
    load_weights(model, sd, source)
    return which


def _merge_sections(base: dict, extra: dict) -> dict:
    """`extra`'s sections merged into `base` key by key, nested sections (`train.ema`) too (a non-mapping value,
    e.g. `metric`, replaces)."""
    out = dict(base)
    for sec, vals in extra.items():
        if isinstance(vals, dict) and isinstance(out.get(sec), dict):
            out[sec] = _merge_sections(out[sec], vals)
        else:
            out[sec] = vals
    return out


def resolve_config(obj: dict, config_file: str | None = None, overrides: dict | None = None) -> TrainingConfig:
    """The TrainingConfig for a loaded checkpoint `obj`.

    A p2sweep checkpoint: its stored `config_yaml`, with the sections of `config_file` (if given) merged on top
    section by section (keys not in the file keep the checkpoint's values), then the dotted `overrides`.
    A bare state_dict stores no config: `load_config(config_file, overrides)` (defaults where no file is given).
    """
    if not is_p2sweep_checkpoint(obj):
        return load_config(config_file, overrides)
    try:
        base = yaml.safe_load(obj.get("config_yaml") or "") or {}
    except yaml.YAMLError:
        raise UserError("checkpoint config_yaml: not valid YAML") from None
    if not isinstance(base, dict):
        raise UserError("checkpoint config_yaml: expected a mapping of config sections")
    if config_file:
        extra = safe_load_yaml(config_file) or {}
        if not isinstance(extra, dict):
            raise UserError(f"{config_file}: expected a mapping of config sections at the top level")
        base = _merge_sections(base, extra)
    return config_from_dict(apply_overrides(base, overrides or {}))


def load_model(path: str, cfg: TrainingConfig | None = None, *, config_file: str | None = None,
               overrides: dict | None = None, prefer_ema: bool = True):
    """(model, cfg, which) from a checkpoint file: a p2sweep checkpoint or a bare official state_dict.

    The file is read once; cfg, when not given, comes from `resolve_config(obj, config_file, overrides)`. The UNet
    of cfg is built and loaded strictly (EMA weights preferred; which in {"ema", "model", "state_dict"}). The model
    is on the CPU in eval mode; move it with `.to(device)`.
    """
    from .unet import model_from_config

    obj = load_file(path)
    if cfg is None:
        cfg = resolve_config(obj, config_file, overrides)
    model = model_from_config(cfg)
    which = load_checkpoint_weights(model, obj, path, prefer_ema=prefer_ema)
    return model.eval(), cfg, which
