"""The figures of `p2sweep report` (matplotlib, Agg): each `fig_*(path, data)` draws from the dict of
`report_data.collect` and returns the PNG's path, or None when the sweep has nothing to show in it."""
from __future__ import annotations

import json
import math

from . import analysis as A
from .table import fmt as _fmt


DPI = 80


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_weights(path: str, data: dict) -> str | None:
    """Weight vs SNR of every weighting in the sweep, each normalised to mean 1 over the T timesteps (Fig. 3)."""
    import numpy as np

    from p2core.schedules import named_snr
    from p2core.weighting import make_weighting, plot_weighting

    from ..record.replicate import trial_config

    curves, seen = [], set()
    for arm in data["arms"].values():  # each arm's own validated config: the base with its swept values
        d = trial_config(data["sweep"]["base"], arm["params"]).diffusion
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
