"""Figures of a sweep (matplotlib, Agg): the sweep metric against images seen, one line per trial."""
from __future__ import annotations

import math


def plot_history(path: str, sweeps: dict, ylabel: str) -> str | None:
    """`sweeps`: {sweep name: [results.Trial]}; returns the PNG path, or None when nothing finite was reported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from p2core.atomic import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    any_line = False
    for sname, trials in sweeps.items():
        for t in trials:
            pts = [(i, v) for i, v in t.history if v is not None and math.isfinite(v)]
            if pts:
                cfg = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in t.params.items())
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"{sname}: {cfg} seed {t.seed}"[:80])
                any_line = True
    if not any_line:
        plt.close(fig)
        return None
    ax.set_xlabel("images seen")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)
    return save_figure(fig, path)
