"""`p2sweep report`: the sweep's answer as one self-contained HTML page, the same as Markdown + PNGs, and a JSON
file with every number shown (no Ray import). Its parts: `report_data` (the numbers), `report_figures` (the
figures), `report_render` (the pages); this module writes them, replacing an older report only once complete.

Everything comes from the sweep's storage (its metadata, Tune's trial states, each trial's `result.json` and the
files a trial wrote under `p2/`) plus, when reachable, the parent MLflow run (provenance) and the Optuna study
(parameter importance). Every comparison stays within one metric name.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from .report_data import grid_files
from .report_figures import fig_curves, fig_importance, fig_parallel, fig_phases, fig_weights
from .report_render import render_html, render_md, sections


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
