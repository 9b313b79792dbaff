"""`p2sweep report`: the sweep's answer as one self-contained HTML page, the same as Markdown + PNGs, and a JSON
file with every number shown (no Ray import; figures with matplotlib, Agg).

Everything comes from the sweep's storage (its metadata, Tune's trial states, each trial's `result.json` and the
files a trial wrote under `p2/`) plus, when reachable, the parent MLflow run (provenance) and the Optuna study
(parameter importance). Every comparison stays within one metric name.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import tempfile
import time

from . import analysis as A
from . import results as R
from .results import UNFINISHED

MIN_IMPORTANCE_TRIALS = 8   # COMPLETE Optuna configurations below which parameter importance is not shown
DPI = 80


def sweep_state(trials: list, expected: int | None) -> str:
    if any(t.state in UNFINISHED for t in trials) or (expected and len(trials) < expected):
        return "unfinished (running, or interrupted: `p2sweep resume` continues it)"
    return "finished"


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


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
    raw = meta.raw or {}
    return {
        "sweep": {"name": meta.name, "metric": meta.metric, "state": sweep_state(trials, expected_trials),
                  "trials": len(trials), "states": {s: sum(t.state == s for t in trials)
                                                    for s in sorted({t.state for t in trials})},
                  "seeds": meta.seeds, "max_images": meta.max_images, "space": raw.get("space", {}),
                  "search": raw.get("search", {}), "scheduler": raw.get("scheduler", {}),
                  "overrides": raw.get("overrides", {}), "base": meta.base, "storage": meta.dir,
                  "reported_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "provenance": provenance,
        "arms": {str(g): {"label": labels[g], "params": params[g], "trials": [t.trial_id for t in ts],
                          "seeds": [t.seed for t in ts], "states": [t.state for t in ts],
                          "nodes": [t.node_ip for t in ts]} for g, ts in groups.items()},
        "metrics": names,
        "curves": curves,
        "tables": tables,
        "comparisons": comparisons,
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


# -- figures ------------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_weights(path: str, data: dict) -> str | None:
    """Weight vs SNR of every weighting in the sweep, each normalised to mean 1 over the T timesteps (Fig. 3)."""
    from dataclasses import asdict
    from types import SimpleNamespace

    import numpy as np

    from p2core.config import DiffusionConfig
    from p2core.schedules import named_snr
    from p2core.weighting import make_weighting, plot_weighting

    curves, seen = [], set()
    for arm in data["arms"].values():
        vals = {**asdict(DiffusionConfig()), **data["sweep"]["base"].get("diffusion", {}),
                **{k.split(".", 1)[1]: v for k, v in arm["params"].items() if k.startswith("diffusion.")}}
        d = SimpleNamespace(**vals)
        key = (d.noise_schedule, d.weighting, d.p2_gamma, d.p2_k, d.min_snr_gamma, d.diffusion_steps)
        if key in seen:
            continue
        seen.add(key)
        snr = named_snr(d.noise_schedule, d.diffusion_steps)
        w = make_weighting(d.weighting, d.p2_gamma, d.p2_k, d.min_snr_gamma)
        curves.append((f"{d.noise_schedule}: {w.label}", snr, w(snr) / np.mean(w(snr))))
    return plot_weighting(path, curves, title="weight / its mean over the T steps (dashed: the 3 SNR phases)")


def _colour(data: dict, g: str):
    order = list(data["arms"])
    return f"C{order.index(g) % 10}"


def fig_curves(path: str, data: dict) -> str | None:
    plt = _plt()
    from p2core.atomic import save_figure

    names = [n for n in data["metrics"] if any(data["curves"][n].values())]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.6), dpi=DPI, squeeze=False)
    for ax, name in zip(axes[0], names):
        for g, pts in data["curves"][name].items():
            if not pts:
                continue
            x = [p["images_seen"] for p in pts]
            col = _colour(data, g)
            ax.plot(x, [p["mean"] for p in pts], marker="o", ms=3, color=col, label=data["arms"][g]["label"][:60])
            ax.fill_between(x, [p["min"] for p in pts], [p["max"] for p in pts], color=col, alpha=0.2)
            for s in data["stops"]:
                if str(s["group"]) == g:
                    ax.axvline(s["images_seen"], color=col, ls=":", lw=1)
        ax.set_title(f"{name}: mean over seeds, band = min..max", fontsize=9)
        ax.set_xlabel("images seen")
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def fig_phases(path: str, data: dict) -> str | None:
    plt = _plt()
    from p2core.atomic import save_figure

    if not any(data["phases"].values()):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=DPI)
    for ax, ph in zip(axes, A.PHASE_NAMES):
        for g, pts in data["phases"].items():
            xy = [(p["images_seen"], p[ph]) for p in pts if p.get(ph) is not None]
            if xy:
                ax.plot(*zip(*xy), color=_colour(data, g), label=data["arms"][g]["label"][:50])
        ax.set_yscale("log")
        ax.set_title(f"{ph} phase", fontsize=9)
        ax.set_xlabel("images seen")
    axes[0].set_ylabel("training loss (own weighting)")
    axes[0].legend(fontsize=6)
    return save_figure(fig, path)


def _param_axis(values):
    """Map a parameter's values to [0, 1] (numbers linearly, anything else by sorted position); tick labels."""
    nums = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    uniq = sorted(set(values), key=lambda v: (str(type(v)), str(v))) if not nums else sorted(set(values))
    if nums and len(uniq) > 1:
        lo, hi = min(uniq), max(uniq)
        return {v: (v - lo) / (hi - lo) for v in uniq}, uniq
    return {v: (i / (len(uniq) - 1) if len(uniq) > 1 else 0.5) for i, v in enumerate(uniq)}, uniq


def fig_parallel(path: str, data: dict) -> str | None:
    """Parallel coordinates: one line per configuration over the swept parameters and the sweep metric (mean)."""
    rows = data["tables"].get(data["sweep"]["metric"], [])
    keys = sorted({k for r in rows for k in r["config"]})
    rows = [r for r in rows if math.isfinite(r["mean"])]
    if len(keys) < 2 or len(rows) < 2:
        return None
    plt = _plt()
    from p2core.atomic import save_figure

    hashable = lambda v: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    axes_maps = [_param_axis([hashable(r["config"].get(k)) for r in rows]) for k in keys]
    ms = [r["mean"] for r in rows]
    lo, hi = min(ms), max(ms)
    cmap = plt.get_cmap("viridis_r")
    fig, ax = plt.subplots(figsize=(1.6 * (len(keys) + 1) + 1, 3.6), dpi=DPI)
    for r in rows:
        t = (r["mean"] - lo) / (hi - lo) if hi > lo else 0.5
        ys = [m[hashable(r["config"].get(k))] for k, (m, _) in zip(keys, axes_maps)] + [t]
        ax.plot(range(len(keys) + 1), ys, color=cmap(t), alpha=0.8)
    for i, (m, uniq) in enumerate(axes_maps):
        ax.axvline(i, color="black", lw=0.6)
        for v in uniq:
            ax.text(i + 0.03, m[v], _fmt(v, 3), fontsize=6, va="center")
    ax.axvline(len(keys), color="black", lw=0.6)
    ax.text(len(keys) + 0.03, 0, _fmt(lo), fontsize=6)
    ax.text(len(keys) + 0.03, 1, _fmt(hi), fontsize=6)
    ax.set_xticks(range(len(keys) + 1), [k.split(".")[-1] for k in keys] + [data["sweep"]["metric"]], fontsize=7)
    ax.set_yticks([])
    ax.set_title("parallel coordinates (colour: metric, darker = better)", fontsize=9)
    return save_figure(fig, path)


def fig_importance(path: str, data: dict) -> str | None:
    imp = (data.get("importance") or {}).get("values")
    if not imp:
        return None
    plt = _plt()
    from p2core.atomic import save_figure

    fig, ax = plt.subplots(figsize=(5, 0.4 * len(imp) + 1), dpi=DPI)
    ks = list(imp)[::-1]
    ax.barh(ks, [imp[k] for k in ks])
    ax.set_xlabel(f"importance ({data['importance']['evaluator']})")
    return save_figure(fig, path)


def grid_files(trials: list) -> tuple[dict, int | None]:
    """({arm: (seed, path)}, images): a sample grid of every arm at the latest point in training that every arm
    has a grid for (the lowest seed that has it), so the grids compare like with like; every trial samples its grids
    from the same initial noise (eval.seed)."""
    import glob

    have: dict = {}  # arm -> {images: (seed, path)}
    for g, ts in A.groups_of(trials).items():
        for t in ts:
            for f in sorted(glob.glob(os.path.join(t.dir, "p2", "samples", "grid_*.png"))) if t.dir else []:
                n = int(os.path.basename(f)[5:-4])
                have.setdefault(g, {}).setdefault(n, (t.seed, f))
    common = set.intersection(*[set(v) for v in have.values()]) if have else set()
    if not common:
        return {}, None
    at = max(common)
    return {g: v[at] for g, v in have.items()}, at


# -- pages --------------------------------------------------------------------------------------------------------

def _table_md(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _table_html(header, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def sections(data: dict, figs: dict, grids: dict) -> list:
    """[(kind, payload)]: the report in order; kind is h2, p, pre, table (header, rows), fig (name, caption),
    grids ([(label, name)]). One structure renders as HTML and as Markdown."""
    s, sw = [], data["sweep"]
    metric = sw["metric"]
    s.append(("h1", f"p2sweep report: {sw['name']}"))
    s.append(("p", f"State: {sw['state']}; {sw['trials']} trials ({', '.join(f'{k} {v}' for k, v in sw['states'].items())})."
                   f" Report made {sw['reported_at']} from {sw['storage']}."))
    s.append(("h2", "The question"))
    s.append(("p", f"Metric {metric} (lower is better), seeds {sw['seeds']}, at most {sw['max_images']:,} images per "
                   f"trial; search {json.dumps(sw['search'])}; scheduler {json.dumps(sw['scheduler'])}."))
    s.append(("table", (["parameter", "values"], [[k, json.dumps(v)] for k, v in sw["space"].items()])))
    prov = data["provenance"] or {}
    s.append(("p", "Provenance: " + (", ".join(f"{k} {v}" for k, v in sorted(prov.items())) or "not available")))
    s.append(("pre", "base config (after the sweep's overrides):\n" + json.dumps(sw["base"], indent=1)))
    comps = data["comparisons"]
    s.append(("h2", "The answer: each arm against its baseline arm"))
    if comps:
        s.append(("ul", [c["sentence"] for c in comps if c["headline"]]))
        s.append(("p", "Difference = arm - baseline over the seeds both ran, paired by seed; interval: two-sided 95% "
                       "Student t over the paired differences (n-1 degrees of freedom); each interval stands alone "
                       "(no correction for several comparisons). Headline: the point with the most paired seeds. "
                       "Every point in training:"))
        s.append(("table", (["metric", "arm", "images", "seeds", "arm values", "baseline values", "diff",
                             "95% interval", "distinguishable"],
                            [[c["metric"], c["arm_label"], c["images_seen"], c["n"], _vals(c["arm_values"]),
                              _vals(c["baseline_values"]), _fmt(c["diff"]), f"[{_fmt(c['low'])}, {_fmt(c['high'])}]",
                              "yes" if c["distinguishable"] else "no"] for c in comps])))
    elif data.get("paired_arms"):
        s.append(("p", "No comparison yet: no arm has a result at the same point and seed as its baseline arm."))
    else:
        s.append(("p", "No comparison: the sweep has no baseline arm (p2_gamma = 0 with the other swept values equal)."))
    s.append(("h2", f"{metric.split('_')[0]} against images seen"))
    s.append(("fig", ("curves", "Mean over the seeds evaluated at each point (a seed that diverged or has not got "
                                "there is left out; per-seed values in report.json), band min..max; dotted lines: "
                                "where ASHA stopped a seed.")))
    if data["stops"]:
        s.append(("table", (["trial", "config", "seed", "stopped at images", "judged on", "value"],
                            [[x["trial"], x["group"], x["seed"], x["images_seen"], x["judged_on"], _fmt(x["value"])]
                             for x in data["stops"]])))
    s.append(("h2", "Results per sampling spec"))
    for name, rows in data["tables"].items():
        s.append(("h3", name))
        s.append(("table", (["", "arm", "images", "mean", "std", "seeds", "per-seed values (seed: value)", "complete"],
                            [["best" if r["best"] else "lowest" if r["lead"] else "", r["arm"], r["images_seen"], _fmt(r["mean"]), _fmt(r["std"], 3),
                              f"{r['n']}/{r['seeds_expected']}",
                              ", ".join(f"{sd}: {_fmt(v)}" for sd, v in zip(r["seeds"], r["values"])),
                              "yes" if r["complete"] else "no"] for r in rows])))
    if data["baselines"]:
        s.append(("table", (["baseline (evaluated, not trained)", "metric", "value"],
                            [[b, k, _fmt(v)] for b, res in data["baselines"].items() for k, v in sorted(res.items())
                             if k in data["metrics"]])))
    s.append(("h2", "Weight against SNR"))
    s.append(("fig", ("weights", "Every weighting of the sweep, normalised to mean 1 over the T timesteps (the paper's "
                                 "Fig. 3 lens); dashed: the coarse / content / clean-up phases at SNR 1e-2 and 1.")))
    s.append(("h2", "Training loss per SNR phase"))
    s.append(("fig", ("phases", "Mean over seeds of the training loss in each phase, as each arm weights it (so "
                                "compare the shape over training, not the level across arms).")))
    s.append(("h2", "Parameters"))
    imp = data.get("importance")
    if imp:
        s.append(("p", imp["note"]))
        if imp.get("values"):
            s.append(("fig", ("importance", "")))
    if "parallel" in figs:
        s.append(("fig", ("parallel", "")))
    elif not imp:
        s.append(("p", "One swept parameter (or one configuration): no parallel coordinates; grid/random sweeps "
                       "have no parameter importance."))
    s.append(("h2", "Samples"))
    if grids:
        s.append(("grids", [(f"{data['arms'][str(g)]['label']} (seed {seed})", f"grid_{i}") for i, (g, (seed, _)) in
                            enumerate(grids.items())]))
        s.append(("p", f"Every arm at {data['grids_at']:,} images (the latest point all arms have a grid for), all "
                       "from the same initial noise (eval.seed)."))
    else:
        s.append(("p", "No sample grid common to every arm in the storage (train.grid_samples 0, an arm stopped "
                       "before any grid, or a sweep from before p2sweep synced trial files to the storage)."))
    c = data["cost"]["total"]
    s.append(("h2", "Cost"))
    s.append(("p", f"{c['images_trained']:,} images trained ({c['images_if_all_to_end']:,} if the trials ASHA stopped "
                   f"had trained to the end: early stopping saved {100 * data['cost']['early_stop_saved_fraction']:.0f}%"
                   f"); {c['images_generated']:,} images generated for evaluation ({c['image_steps']:,} image-steps), "
                   f"each through the feature network once (the reference statistics, computed once per sweep, are "
                   f"not counted); seconds summed over trials: training {c['train_seconds']:.0f}, sampling "
                   f"{c['sample_seconds']:.0f}, features {c['feature_seconds']:.0f}, trial time in all "
                   f"{c['wall_seconds']:.0f} (Tune's time along each trial's kept path: work redone after a crash is "
                   f"not counted)."))
    s.append(("table", (["trial", "config", "seed", "state", "node", "images trained", "images generated",
                         "train s", "sample s", "feature s"],
                        [[t["trial_id"], t["group"], t["seed"], t["state"], t["node"] or "-", t["images_trained"],
                          t["images_generated"], f"{t['train_seconds']:.0f}", f"{t['sample_seconds']:.0f}",
                          f"{t['feature_seconds']:.0f}"] for t in data["cost"]["per_trial"]])))
    s.append(("p", "Every number above is in report.json."))
    return s


def _vals(v):
    return ", ".join(_fmt(x) for x in v)


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}"
       "th{background:#f3f3f3}pre{background:#f7f7f7;padding:.6em;max-height:18em;overflow:auto;font-size:12px}"
       "img{max-width:100%}.grids{display:flex;flex-wrap:wrap;gap:12px}.grids figure{margin:0}"
       "figcaption{font-size:12px;color:#555}")


def render_html(secs: list, images: dict) -> str:
    """`images`: {name: PNG bytes}, embedded as data URIs (one file)."""
    def img(name, alt):
        b = images.get(name)
        if b is None:
            return ""
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'

    out = []
    for kind, p in secs:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(p)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(p)}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li><b>{html.escape(x)}</b></li>" for x in p) + "</ul>")
        elif kind == "pre":
            out.append(f"<details><summary>base config</summary><pre>{html.escape(p)}</pre></details>")
        elif kind == "table":
            out.append(_table_html(*p))
        elif kind == "fig" and p[0] in images:
            out.append(f"<figure>{img(p[0], p[1] or p[0])}<figcaption>{html.escape(p[1])}</figcaption></figure>")
        elif kind == "grids":
            out.append('<div class="grids">' + "".join(
                f"<figure>{img(name, label)}<figcaption>{html.escape(label)}</figcaption></figure>"
                for label, name in p if name in images) + "</div>")
    title = html.escape(secs[0][1]) if secs else "p2sweep report"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
            f"<body>{''.join(out)}</body></html>\n")


def render_md(secs: list, files: dict) -> str:
    """`files`: {name: relative PNG path}."""
    out = []
    for kind, p in secs:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + p)
        elif kind == "p":
            out.append(p)
        elif kind == "ul":
            out.append("\n".join(f"- **{x}**" for x in p))
        elif kind == "pre":
            out.append("<details><summary>base config</summary>\n\n```json\n" + p.split("\n", 1)[1] +
                       "\n```\n</details>")
        elif kind == "table":
            out.append(_table_md(*p))
        elif kind == "fig" and p[0] in files:
            out.append(f"![{p[1] or p[0]}]({files[p[0]]})" + (f"\n\n*{p[1]}*" if p[1] else ""))
        elif kind == "grids":
            out.append(_table_md([label for label, n in p if n in files],
                                 [[f"![{label}]({files[n]})" for label, n in p if n in files]]))
    return "\n\n".join(out) + "\n"


def write_report(out_dir: str, data: dict, trials: list) -> dict:
    """Write report.html, report.md, report.json and figures/*.png into `out_dir`, replacing an older report there
    only once the new one is complete. Returns {kind: path}."""
    from p2core.errors import UserError

    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and (
            not os.listdir(out_dir) or os.path.isfile(os.path.join(out_dir, "report.json")))):
        raise UserError(f"--out {out_dir}: exists and is not a p2sweep report folder (no report.json): refusing to "
                        "replace it")
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    try:
        fdir = os.path.join(tmp, "figures")
        os.makedirs(fdir)
        figs = {}
        for name, fn in (("curves", fig_curves), ("weights", fig_weights), ("phases", fig_phases),
                         ("parallel", fig_parallel), ("importance", fig_importance)):
            p = fn(os.path.join(fdir, f"{name}.png"), data)
            if p:
                figs[name] = p
        grids, data["grids_at"] = grid_files(trials)
        for i, (_, src) in enumerate(grids.values()):
            dst = os.path.join(fdir, f"grid_{i}.png")
            shutil.copyfile(src, dst)
            figs[f"grid_{i}"] = dst
        data["figures"] = {k: os.path.relpath(v, tmp) for k, v in figs.items()}
        secs = sections(data, figs, grids)
        images = {}
        for k, v in figs.items():
            with open(v, "rb") as f:
                images[k] = f.read()
        with open(os.path.join(tmp, "report.html"), "w") as f:
            f.write(render_html(secs, images))
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(render_md(secs, data["figures"]))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(_clean(data), f, indent=1, default=str)
        umask = os.umask(0)
        os.umask(umask)
        for root, dirs, files in os.walk(tmp):  # mkdtemp/mkstemp make 0700/0600: give the usual modes
            os.chmod(root, 0o777 & ~umask)
            for f_ in files:
                os.chmod(os.path.join(root, f_), 0o666 & ~umask)
        if os.path.isdir(out_dir):
            old = out_dir.rstrip("/") + f".old-{os.getpid()}"
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"html": os.path.join(out_dir, "report.html"), "md": os.path.join(out_dir, "report.md"),
            "json": os.path.join(out_dir, "report.json"), "dir": out_dir}


def _clean(o):
    """Strict JSON: NaN -> null, +-inf -> "inf"/"-inf" (a metric reported as the worst)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o
