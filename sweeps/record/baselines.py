"""Baseline rows: external checkpoints (official P2 / guided-diffusion state_dicts or p2sweep checkpoints) that a
sweep evaluates with its own metric and FID code, without training them.

Sweep file:
    baselines:
      - name: official_p2_gamma1
        checkpoint: /models/ema_0.9999_500000.pt
        overrides: {model.num_channels: 128}     # model flags on top of the sweep's base config (optional)

Each baseline is evaluated once (every spec in eval.sampling_steps, same n, same reference statistics), before the
trials start, as a Ray task with the trials' resources (so the driver may be a CPU-only head node), and keeps the results in <experiment>/p2sweep_baselines.json; each gets an MLflow child
run tagged p2sweep.role=baseline under the sweep's parent run. A resumed sweep does not evaluate them again.
"""
from __future__ import annotations

import json
import os
import re
import sys

from p2core.config import apply_overrides, config_from_dict
from p2core.errors import UserError

FILE = "p2sweep_baselines.json"


def parse_baselines(raw, base: dict, here: str) -> list[dict]:
    if raw in (None, []):
        return []
    if not isinstance(raw, list):
        raise UserError("baselines: expected a list of {name, checkpoint, overrides}")
    out, names = [], set()
    for i, b in enumerate(raw):
        key = f"baselines[{i}]"
        if not isinstance(b, dict):
            raise UserError(f"{key}: expected a mapping with name and checkpoint")
        for k in b:
            if k not in ("name", "checkpoint", "overrides"):
                raise UserError(f"{key}.{k}: unknown key")
        name = b.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise UserError(f"{key}.name: required, unique, letters/digits/._- only")
        names.add(name)
        ck = b.get("checkpoint")
        if not isinstance(ck, str) or not ck:
            raise UserError(f"{key}.checkpoint: required")
        path = ck if os.path.isabs(ck) else os.path.join(here, ck)
        if not os.path.isfile(path) and os.path.isfile(ck):
            path = os.path.abspath(ck)
        if not os.path.isfile(path):
            raise UserError(f"{key}.checkpoint: {ck}: no such file")
        ov = b.get("overrides") or {}
        if not isinstance(ov, dict):
            raise UserError(f"{key}.overrides: expected a mapping of dotted keys")
        try:
            config_from_dict(apply_overrides(base, ov))
        except UserError as e:
            raise UserError(f"{key}.overrides: {e}") from None
        out.append({"name": name, "checkpoint": os.path.abspath(path), "overrides": ov})
    return out


def load_results(exp_dir: str) -> dict:
    from ..storage.fs import join, read_text

    text = read_text(join(exp_dir, FILE))
    return json.loads(text) if text else {}


def evaluate_one(b: dict, base: dict, cache_dir: str, threads: int = 0) -> tuple[dict, dict]:
    """Evaluate one baseline (every spec of eval.sampling_steps) wherever it runs (a Ray task with the trials'
    accelerator, or the driver); returns (results, the config it was evaluated with)."""
    import torch

    from p2core.checkpoint import load_model
    from p2core.data import load_dataset
    from p2core.evaluation import Evaluator
    from p2core.trainer import resolve_device

    torch.set_num_threads(threads or os.cpu_count() or 1)
    data = apply_overrides(base, b["overrides"])
    data.setdefault("eval", {})["cache_dir"] = cache_dir
    cfg = config_from_dict(data)
    model, cfg, which = load_model(b["checkpoint"], cfg)
    dev = resolve_device(cfg.train.device)
    images, key = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels)
    print(f"baseline {b['name']}: evaluating {b['checkpoint']} ({which}) at {cfg.eval.sampling_steps} on {dev}",
          file=sys.stderr)
    res = Evaluator(cfg, images, key, device=dev, progress=True).evaluate_model(
        model.to(dev), list(cfg.eval.sampling_steps), seed=cfg.eval.seed)
    return {**res, "checkpoint": b["checkpoint"], "weights": which, "overrides": b["overrides"]}, cfg.to_dict()


def evaluate(baselines: list[dict], base: dict, exp_dir: str, cache_dir: str, tracker=None, run=None) -> dict:
    """Evaluate the baselines not yet in the results file, one `run(b)` each (default: `evaluate_one` here; the
    sweep passes a Ray task); returns {name: {metrics..., checkpoint}}."""
    if not baselines:
        return {}
    from ..storage.fs import join, write_text

    run = run or (lambda b: evaluate_one(b, base, cache_dir))
    done = load_results(exp_dir)
    for b in baselines:
        if b["name"] in done:
            continue
        res, cfg_dict = run(b)
        done[b["name"]] = res
        write_text(join(exp_dir, FILE), json.dumps(done, indent=1, default=str))
        if tracker is not None:
            tracker(b, config_from_dict(cfg_dict), res)
    return done
