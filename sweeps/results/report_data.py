"""The numbers of `p2sweep report`: everything its pages show, collected from the sweep's trials (and the
provenance, baselines and parameter importance the command reads) as one JSON-able dict. No figures, no Ray import.
Every comparison stays within one metric name."""
from __future__ import annotations

import os
import time

from . import analysis as A
from . import trials as R
from .trials import UNFINISHED
from ..storage import trial_files as TF


MIN_IMPORTANCE_TRIALS = 8   # COMPLETE Optuna configurations below which parameter importance is not shown


def sweep_state(trials: list, expected: int | None) -> str:
    if any(t.state in UNFINISHED for t in trials) or (expected and len(trials) < expected):
        return "unfinished (running, or interrupted: `p2sweep resume` continues it)"
    return "finished"


def collect(meta, trials: list, *, provenance: dict, baselines: dict, importance: dict | None,
            expected_trials: int | None = None) -> dict:
    """Every number of the report, as a JSON-able dict."""
    groups = A.groups_of(trials)
    params = {g: ts[0].params for g, ts in groups.items()}
    labels = {g: A.arm_label(p, meta.base) for g, p in params.items()}
    label_of = lambda r: labels.get(r.group) if r.group >= 0 else A.arm_label(r.config, meta.base)
    names = A.family(trials, meta.metric)
    rows_of = {}
    for ts in groups.values():
        for t in ts:
            rows_of[t.trial_id] = A.trial_rows(t)
    curves = {name: {str(g): A.curve(ts, name) for g, ts in groups.items()} for name in names}
    ranked = R.group_rows(trials, meta.metric, meta.max_images, len(meta.seeds))
    tables = {}
    for name in names:
        rows = [r for r in ranked if r.metric == name]
        lead = next((r for r in rows if r.complete), None)
        # "best": the row `p2sweep best` picks (over every spec); "lead": the first complete row of this spec
        tables[name] = [{"group": r.group, "arm": label_of(r), "config": r.config,
                         "images_seen": r.images_seen, "mean": r.mean, "std": r.std, "n": r.n,
                         "seeds_expected": r.seeds_expected, "seeds": r.seeds, "values": r.values,
                         "trials": r.trials, "complete": r.complete, "best": bool(ranked) and r is ranked[0],
                         "lead": r is lead} for r in rows]
    comparisons, paired_arms = [], []
    for g, p in params.items():
        b = A.baseline_of(p, params)
        if b is None:
            continue
        paired_arms.append([str(g), str(b)])
        for name in names:
            for c in A.compare(groups[g], groups[b], name, g, b, len(meta.seeds)):
                comparisons.append({**c.to_dict(), "arm_label": labels[g], "baseline_label": labels[b],
                                    "sentence": c.sentence(labels[g])})
    # post-hoc EMAs: each arm against its baseline at one common EMA and each at its own best EMA
    means = {(r.config_key, r.metric): r.mean for r in ranked}
    ema_answer = []
    for g_s, b_s in paired_arms:
        g, b = next(k for k in groups if str(k) == g_s), next(k for k in groups if str(k) == b_s)
        ema_answer += [{**x, "arm_label": labels[g]} for x in A.own_best_ema(
            groups[g], groups[b], names, lambda grp, n: means.get((grp, n)), g, b, len(meta.seeds), labels[g])]
    # the headline of each (arm, metric): the point with the most paired seeds, the latest on a tie
    heads = {}
    for c in comparisons:
        k = (str(c["arm"]), c["metric"])
        if k not in heads or (c["n"], c["images_seen"]) > (heads[k]["n"], heads[k]["images_seen"]):
            heads[k] = c
    for c in comparisons:
        c["headline"] = heads[(str(c["arm"]), c["metric"])] is c
    phases = {}
    for g, ts in groups.items():
        phases[str(g)] = A.mean_phase_curve([A.phase_losses(rows_of[t.trial_id]) for t in ts])
    stops = [{"trial": t.trial_id, "group": str(A.group_key(t)), "seed": t.seed, "images_seen": t.last_rung[0],
              "judged_on": t.last_rung[1], "value": t.last_rung[2]}
             for t in trials if t.state == "STOPPED" and t.last_rung]
    costs = [A.trial_cost(t, rows_of[t.trial_id]) for t in trials]
    cost = A.cost_summary(costs, meta.max_images)
    rec = meta.spec.record()
    return {
        "sweep": {"name": meta.name, "metric": meta.metric, "state": sweep_state(trials, expected_trials),
                  "trials": len(trials), "states": {s: sum(t.state == s for t in trials)
                                                    for s in sorted({t.state for t in trials})},
                  "seeds": meta.seeds, "max_images": meta.max_images, "space": rec["space"],
                  "search": rec["search"], "scheduler": rec["scheduler"],
                  "overrides": rec["overrides"], "base": meta.base, "storage": meta.dir,
                  "reported_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "provenance": provenance,
        "arms": {str(g): {"label": labels[g], "params": params[g], "trials": [t.trial_id for t in ts],
                          "seeds": [t.seed for t in ts], "states": [t.state for t in ts],
                          "nodes": [t.node_ip for t in ts]} for g, ts in groups.items()},
        "metrics": names,
        "curves": curves,
        "tables": tables,
        "comparisons": comparisons,
        "ema_answer": ema_answer,
        "paired_arms": paired_arms,
        "phases": phases,
        "stops": stops,
        "baselines": baselines,
        "importance": importance,
        "grids_at": None,
        "cost": {"total": {k: v for k, v in cost.__dict__.items() if k != "trials"},
                 "early_stop_saved_fraction": cost.early_stop_saved,
                 "per_trial": [c.__dict__ for c in costs]},
    }


def grid_files(trials: list) -> tuple[dict, int | None]:
    """({arm: (seed, path)}, images): a sample grid of every arm at the latest point in training that every arm
    has a grid for (the lowest seed that has it), so the grids compare like with like; every trial samples its grids
    from the same initial noise (eval.seed)."""
    import glob

    have: dict = {}  # arm -> {images: (seed, path)}
    for g, ts in A.groups_of(trials).items():
        for t in ts:
            for f in sorted(glob.glob(os.path.join(TF.samples_dir(t.dir), "grid_*.png"))) if t.dir else []:
                n = int(os.path.basename(f)[5:-4])
                have.setdefault(g, {}).setdefault(n, (t.seed, f))
    common = set.intersection(*[set(v) for v in have.values()]) if have else set()
    if not common:
        return {}, None
    at = max(common)
    return {g: v[at] for g, v in have.items()}, at
