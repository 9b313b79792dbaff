"""Reading a sweep back from its experiment directory (no Ray import): trials, status, best, compare.

Each Ray trial directory holds `result.json` (one JSON line per report) and, for trials that raised, `error.txt`;
the driver also writes `p2sweep_trials.json` with Ray's trial states when a run or resume ends.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics

from p2core.errors import UserError
from p2core.metrics import is_metric_name, parse_metric_name

META = "p2sweep.json"
STATES = "p2sweep_trials.json"


def storage_root(storage: str | None) -> str:
    return storage or os.environ.get("P2SWEEP_STORAGE") or os.path.join(os.path.expanduser("~"), "p2sweep")


def exp_dir(name: str, storage: str | None) -> str:
    return os.path.join(storage_root(storage), name)


def load_meta(name: str, storage: str | None) -> dict:
    d = exp_dir(name, storage)
    p = os.path.join(d, META)
    if not os.path.isfile(p):
        raise UserError(f"unknown sweep {name!r} in storage {storage_root(storage)} (no {META} in {d})")
    with open(p) as f:
        return json.load(f)


def _read_results(path: str) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return out


def load_trials(d: str, metric: str, max_images: int) -> list[dict]:
    states = {}
    sp = os.path.join(d, STATES)
    if os.path.exists(sp):
        with open(sp) as f:
            states = json.load(f)
    trials = []
    for rj in sorted(glob.glob(os.path.join(d, "*", "result.json"))):
        tdir = os.path.dirname(rj)
        res = _read_results(rj)
        pj = os.path.join(tdir, "params.json")
        config = json.load(open(pj)) if os.path.exists(pj) else (res[0].get("config", {}) if res else {})
        m = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(tdir))
        tid = res[0]["trial_id"] if res else (m.group(1) if m else os.path.basename(tdir))
        last = res[-1] if res else {}
        hist = [(r.get("images_seen", 0), r.get(metric)) for r in res if r.get(metric) is not None]
        evals = {}
        for r in res:  # per metric name, the latest value
            for k, v in r.items():
                if isinstance(v, (int, float)) and is_metric_name(k):
                    evals[k] = v
        best_vals = [v for _, v in hist if v is not None and math.isfinite(v)]
        state = states.get(tid, {}).get("state")
        if state is None:
            if last.get("diverged"):
                state = "DIVERGED"
            elif last.get("final"):
                state = "TERMINATED"
            elif os.path.exists(os.path.join(tdir, "error.txt")):
                state = "ERROR"
            else:
                state = "STOPPED" if res else "PENDING"
        if last.get("diverged"):
            state = "DIVERGED"
        trials.append({"trial_id": tid, "dir": tdir, "config": config, "state": state,
                       "images_seen": int(last.get("images_seen", 0)), "latest": hist[-1][1] if hist else None,
                       "best": min(best_vals) if best_vals else None, "history": hist, "evals": evals,
                       "complete": bool(last.get("final")) and not last.get("diverged"),
                       "diverged": bool(last.get("diverged"))})
    return trials


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def status_rows(trials: list[dict], metric: str):
    keys = sorted({k for t in trials for k in t["config"]})
    header = ["trial"] + keys + ["state", "images", f"latest {metric}", f"best {metric}"]
    rows = [[t["trial_id"]] + [_fmt(t["config"].get(k)) for k in keys] +
            [t["state"], str(t["images_seen"]), _fmt(t["latest"]), _fmt(t["best"])] for t in trials]
    return header, rows


def group_rows(trials: list[dict], metric: str, scope: str = "last") -> list[dict]:
    """One row per (configuration without seed, sampling spec): mean and spread over seeds."""
    kind, n, _ = parse_metric_name(metric)
    groups: dict = {}
    for t in trials:
        cfg = {k: v for k, v in t["config"].items() if k != "train.seed"}
        ck = json.dumps(cfg, sort_keys=True)
        for name, v in t["evals"].items():
            k2, n2, spec = parse_metric_name(name)
            if (k2, n2) != (kind, n):
                continue
            if scope == "best" and name == metric:
                v = t["best"]
            if v is None:
                continue
            g = groups.setdefault((ck, spec), {"config": cfg, "spec": spec, "values": [], "trials": [],
                                               "complete": True, "metric": name})
            g["values"].append(v)
            g["trials"].append(t["trial_id"])
            g["complete"] &= t["complete"]
    rows = []
    for g in groups.values():
        vals = g["values"]
        finite = [v for v in vals if math.isfinite(v)]
        g["mean"] = statistics.fmean(finite) if len(finite) == len(vals) else math.inf
        g["std"] = statistics.stdev(finite) if len(finite) > 1 else 0.0
        g["n"] = len(vals)
        rows.append(g)
    # complete (full-length) rows rank ahead of trials that ASHA stopped early
    rows.sort(key=lambda g: (not g["complete"], g["mean"]))
    return rows


def best_export_yaml(meta: dict, row: dict) -> str:
    import yaml

    from p2core.config import apply_overrides, config_from_dict
    from p2core.metrics import metric_name

    base = meta["base"]
    data = apply_overrides(base, row["config"])
    kind, n, _ = parse_metric_name(meta["metric"])
    ext = data.get("eval", {}).get("extractor", "inception")
    data["eval"]["sampling_steps"] = [row["spec"]]
    data["metric"] = metric_name(kind.lstrip("r"), n, row["spec"], ext)
    cfg = config_from_dict(data)  # validated: `p2sweep train` accepts it unchanged
    head = (f"# Best configuration of sweep {meta['name']!r} by {row['metric']} = {row['mean']:.6g}"
            f" (+- {row['std']:.3g} over {row['n']} seed(s)); trial(s): {', '.join(row['trials'])}\n"
            f"# Exported by `p2sweep best --export`; train it with `p2sweep train THIS_FILE` (set train.total_images).\n")
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def rung_history(d: str, metric: str) -> list[tuple[str, int, float]]:
    """(trial_id, images_seen, metric) of every report so far, in time order (to rebuild ASHA's rungs)."""
    out = []
    for rj in glob.glob(os.path.join(d, "*", "result.json")):
        for r in _read_results(rj):
            if r.get(metric) is not None:
                out.append((r.get("timestamp", 0), r["trial_id"], int(r.get("images_seen", 0)), float(r[metric])))
    return [(t, i, v) for _, t, i, v in sorted(out)]
