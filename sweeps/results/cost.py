"""What a sweep cost, counted from its trials' reports (`result.json` rows): images trained, image-steps generated,
images through the feature network, seconds; and what the same study would cost done naively, one training per
value of a post-hoc dimension (sampling steps, EMA). Pure functions over plain rows: `bench/sweep_cost.py` runs the
sweeps and prints these; tests check the counts on hand-made rows."""
from __future__ import annotations

import glob
import json
import math
import os

from p2core.metrics import CHOSEN, split_ema, with_ema

from .analysis import generations, steps_of


def read_trials(exp_dir: str) -> list[dict]:
    """[{params, rows}] per trial of the experiment folder: `rows` = its reports (a later report at the same image
    count wins), `params` = its searched values without the group and seed."""
    out = []
    for rj in sorted(glob.glob(os.path.join(exp_dir, "*", "result.json"))):
        by_point = {}
        with open(rj) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    by_point[r["images_seen"]] = r
        if by_point:
            rows = [by_point[k] for k in sorted(by_point)]
            params = {k: v for k, v in rows[0]["config"].items() if k not in ("p2sweep_group", "train.seed")}
            out.append({"params": params, "rows": rows})
    return out


def key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def train_seconds(trial: dict) -> float:
    last = trial["rows"][-1]
    return float(last.get("time_total_s", 0.0)) - sum(float(r.get("eval_seconds", 0.0)) for r in trial["rows"])


def strategy_cost(trials: list[dict], ref_samples: int, ref_seconds: float = 0.0) -> dict:
    """Cost of a p2sweep run from its trials' reports; reference statistics counted once. `ema_eval_seconds`: the
    part of the trial seconds spent on the post-hoc EMAs (reconstruction and their evaluations)."""
    c = {"images_trained": 0, "image_steps_generated": 0, "images_featurised": ref_samples,
         "trial_seconds": ref_seconds, "ema_eval_seconds": 0.0}
    for t in trials:
        c["images_trained"] += int(t["rows"][-1]["images_seen"])
        c["trial_seconds"] += float(t["rows"][-1].get("time_total_s", 0.0))
        for r in t["rows"]:
            c["ema_eval_seconds"] += float(r.get("ema_eval_seconds", 0.0))
            for spec, n in generations(r):
                c["image_steps_generated"] += n * steps_of(spec)
                c["images_featurised"] += n
    return c


def _naive(full: list[dict], runs, num_samples: int, ref_samples: int, ref_seconds: float) -> dict:
    """Per configuration of `full`, one run per (EMA, specs) of `runs`: the configuration's training, its own
    reference statistics, and one evaluation of `num_samples` per spec with that EMA (its measured time)."""
    c = {"images_trained": 0, "image_steps_generated": 0, "images_featurised": 0, "trial_seconds": 0.0}
    for t in full:
        last = t["rows"][-1]
        for ema, specs in runs:
            sfx = "" if ema is None else with_ema("", ema)
            c["images_trained"] += int(last["images_seen"])
            c["images_featurised"] += ref_samples
            c["trial_seconds"] += train_seconds(t) + ref_seconds
            for spec in specs:
                c["image_steps_generated"] += num_samples * steps_of(spec)
                c["images_featurised"] += num_samples
                c["trial_seconds"] += (float(last.get(f"gen_seconds_{spec}{sfx}", 0.0))
                                       + float(last.get(f"feat_seconds_{spec}{sfx}", 0.0)))
    return c


def naive_cost(full: list[dict], specs, num_samples: int, ref_samples: int, ref_seconds: float = 0.0) -> dict:
    """Cost of training every (configuration, steps) on its own, from the trials of a run without early stopping:
    per pair, the configuration's training, one evaluation of `num_samples` at that spec, its own reference."""
    return _naive(full, [(None, [spec]) for spec in specs], num_samples, ref_samples, ref_seconds)


def naive_ema_cost(full: list[dict], specs, sigma_rels, num_samples: int, ref_samples: int,
                   ref_seconds: float = 0.0) -> dict:
    """Cost of the EMA dimension done naively: one training per (configuration, EMA value) (the tracked EMA, then
    each of `sigma_rels`), each with its own reference and one evaluation of `num_samples` per sampling spec, from
    a run that scored every EMA fully (its `gen_seconds_<spec>_ema<s>` are each EMA's evaluation times)."""
    return _naive(full, [(e, list(specs)) for e in (None, *sigma_rels)], num_samples, ref_samples, ref_seconds)


def winner(trials: list[dict], kind_n: str, specs, emas=(None,)) -> tuple | None:
    """(params key, spec, EMA, value) with the lowest `{kind_n}_{spec}[_ema...]` among the trials' final reports,
    over `emas` (None: the tracked EMA; a sigma_rel; `CHOSEN`, given as the sigma_rel the report says it chose)."""
    best = None
    for t in trials:
        last = t["rows"][-1]
        if not last.get("final"):
            continue
        for spec in specs:
            for ema in emas:
                name = f"{kind_n}_{spec}" if ema is None else with_ema(f"{kind_n}_{spec}", ema)
                v = last.get(name)
                if v is None or not math.isfinite(v) or (best is not None and not v < best[3]):
                    continue
                what = (None if last.get("ema_chosen_tracked") else float(last["ema_chosen"])) if ema == CHOSEN else ema
                best = (key(t["params"]), spec, what, float(v))
    return best


def same_choice(a: tuple | None, b: tuple | None, tracked_sigma_rel: float) -> bool:
    """Two winners name the same (configuration, steps, EMA), the tracked EMA being `tracked_sigma_rel`."""
    if not a or not b:
        return False
    ema = [tracked_sigma_rel if w[2] is None else w[2] for w in (a, b)]
    return a[:2] == b[:2] and abs(ema[0] - ema[1]) < 1e-9


def chosen_against_full(chosen: list[dict], full: list[dict], kind_n: str, specs,
                        tracked_sigma_rel: float) -> float | None:
    """The largest |value| difference between a cheap-path run's `_emachosen` metrics and the fully scored run's
    metric of the EMA it chose (the same trainings and noise, so 0 up to run-to-run float noise)."""
    by = {key(t["params"]): t["rows"][-1] for t in full}
    diffs = []
    for t in chosen:
        last, other = t["rows"][-1], by.get(key(t["params"]))
        if other is None or "ema_chosen" not in last:
            continue
        for spec in specs:
            name = f"{kind_n}_{spec}"
            mine = last.get(with_ema(name, CHOSEN))
            s = tracked_sigma_rel if last.get("ema_chosen_tracked") else float(last["ema_chosen"])
            theirs = [v for k, v in other.items() if split_ema(k) == (name, s)] or (
                [other[name]] if abs(s - tracked_sigma_rel) < 1e-9 and name in other else [])
            if mine is not None and theirs:
                diffs.append(abs(mine - theirs[0]))
    return max(diffs) if diffs else None


def rung_vs_end(asha: list[dict], full: list[dict], rung_metric: str, metric: str) -> dict:
    """Spearman rank correlation over configurations: the rung's cheap metric (ASHA run) vs the sweep metric at the
    end (run without early stopping)."""
    from scipy.stats import spearmanr

    cheap = {key(t["params"]): r[rung_metric] for t in asha for r in t["rows"] if rung_metric in r}
    top = {key(t["params"]): t["rows"][-1][metric] for t in full if metric in t["rows"][-1]}
    common = sorted(set(cheap) & set(top))
    if len(common) < 3:
        return {"configs": len(common), "spearman": None}
    rho = spearmanr([cheap[k] for k in common], [top[k] for k in common]).statistic
    return {"configs": len(common), "spearman": round(float(rho), 3)}
