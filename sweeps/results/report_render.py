"""The pages of `p2sweep report`: one list of sections (`sections`) from the collected data, rendered as one
self-contained HTML page (figures embedded) and as Markdown beside PNG files."""
from __future__ import annotations

import base64
import html
import json

from .table import fmt as _fmt


def _ema_cell(name: str) -> str:
    from p2core.metrics import ema_name, split_ema

    return ema_name(split_ema(name)[1])


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
        if data.get("ema_answer"):
            s.append(("h3", "At one common EMA and at each arm's own best EMA"))
            s.append(("p", "With post-hoc EMAs (eval.ema_sigma_rels), each arm and its baseline are also compared "
                           "with each at the EMA of its lowest mean (the row `best` shows), against the comparison at "
                           "the tracked EMA; both arms get the same optimistic choice."))
            s.append(("table", (["arm", "spec", "EMA (arm / baseline)", "at the tracked EMA", "each at its best EMA",
                                 "verdict changes"],
                                [[x["arm_label"], x["spec_metric"], f"{_ema_cell(x['arm_metric'])} / "
                                  f"{_ema_cell(x['baseline_metric'])}", x["common_verdict"], x["own_best_verdict"],
                                  "yes" if x["verdict_changes"] else "no"] for x in data["ema_answer"]])))
            s.append(("ul", [x["sentence"] for x in data["ema_answer"]]))
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
    from p2core.metrics import split_ema

    emas = any(split_ema(name)[1] is not None for name in data["tables"])
    s.append(("h2", "Results per sampling spec and EMA" if emas else "Results per sampling spec"))
    if emas:
        s.append(("p", "A name ending in _ema<sigma_rel> is that power-function EMA reconstructed post hoc from the "
                       "trial's snapshots at each point (eval.ema_sigma_rels), scored from the same initial noise as "
                       "the tracked EMA (the name without the suffix). The best row is the minimum over every "
                       "sampling spec and EMA, an optimistic choice; compare arms within one name."
                       + (" A name ending in _emachosen is, for each seed at each point, the EMA (the tracked one or "
                          "a listed sigma_rel) that the cheap metric eval.ema_choose_on ranked first there, scored "
                          "on this metric: one selection rule for every arm, so arms compare within it; the choice "
                          "is made on a cheaper metric from the same initial noise, correlated with this one, so "
                          "it is still somewhat optimistic." if any(split_ema(n)[1] == "chosen" for n in data["tables"]) else "")))
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
