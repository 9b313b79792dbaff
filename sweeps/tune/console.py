"""What a researcher sees while a sweep runs: one table of the sweep's trials and one line per ASHA decision, in
place of Ray Tune's default reporter (whose columns are whatever the trials report first, interleaved with warnings
nobody can act on). `p2sweep run/resume --verbose` keeps Ray's own output for debugging.

The table lists each trial with its configuration, the swept parameters, its seed, its state, images seen out of
the total, the last rung judged with its metric, and the best value of the sweep metric so far; a line above it
names the best configuration so far. It is printed when something changed, at most every `interval` seconds, and
when a trial ends.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time

from ray.tune import Callback

from ..compat import MLFLOW_DB_LOGGER
from ..record.replicate import Replicate
from ..record.trial_report import TrialReport, judged_rungs
from ..results.table import format_table

QUIET_ENV = {
    # a warning a p2sweep user cannot act on (p2sweep keeps the latest and the best checkpoint by design)
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Tune's older reporter, which verbose=0 silences whole (the newer one still prints its configuration box)
    "RAY_AIR_NEW_OUTPUT": "0",
    # TensorBoard files are not p2sweep's record (MLflow is): no TBX logger, so no "NaN or Inf found in input
    # tensor." for the +inf ckpt_score of a rung judged on a cheaper metric, and no hint into Ray's session folder.
    # JSON (result.json, read back by p2sweep) and CSV loggers are passed explicitly (`loggers()`).
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}
QUIET_LOGGERS = (MLFLOW_DB_LOGGER,)  # "Creating initial MLflow database tables..."


def quiet_tune(verbose: bool) -> None:
    """The driver's environment for the console (read by Tune when the Tuner is built and fit)."""
    if verbose:
        return
    os.environ.update(QUIET_ENV)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def loggers() -> list:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


def with_loggers(callbacks: list) -> list:
    """`callbacks` plus the JSON and CSV loggers where missing (a tuner.pkl pickled before they were explicit)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    out = list(callbacks)
    for cls in (JsonLoggerCallback, CSVLoggerCallback):
        if not any(isinstance(c, cls) for c in out):
            out.append(cls())
    return out


def decision_log(stream=None) -> logging.Handler:
    """ASHA's decisions (logger `p2sweep.asha`, one INFO line each) on the console, once per process."""
    log = logging.getLogger("p2sweep.asha")
    for h in log.handlers:
        if getattr(h, "_p2sweep", False):
            return h
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    h._p2sweep = True
    log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    return h


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class SweepConsole(Callback):
    """The sweep's table on the driver's console (a Tune Callback; never raises into Tune)."""

    def __init__(self, metric: str, max_images: int, params: list, interval: float = 30.0, stream=None,
                 milestones: list | None = None):
        self.metric, self.max_images, self.params, self.interval = metric, int(max_images), list(params), interval
        self.milestones = list(milestones or [])  # ASHA's rungs below the end (scheduler.ema_rule best cells)
        self.stream = stream
        self._rows: dict = {}
        self._last = 0.0
        self._dirty = False

    def __getstate__(self):  # pickled into tuner.pkl: no stream, no rows of this session
        d = dict(self.__dict__)
        d["stream"], d["_rows"] = None, {}
        return d

    def _row(self, trial) -> dict:
        return self._rows.setdefault(trial.trial_id, {"name": str(trial), "config": dict(trial.config), "state": "PENDING",
                                                      "images": 0, "rung": "", "best": None})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "RUNNING"
        self._dirty = True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        try:
            rep = TrialReport.from_result(self.metric, result)
        except Exception:  # a malformed report is not the console's to judge
            return
        r = self._row(trial)
        r["state"], r["images"] = "RUNNING", rep.images_seen
        r["rung"] = f"{rep.images_seen:,}: {rep.rung_metric} {_fmt(rep.rung_value)}"
        r.setdefault("judged", {})[rep.images_seen] = (rep.rung_metric, rep.judged)
        if rep.rung_candidates:  # scheduler.ema_rule best: what ASHA compares is the EMA the seeds choose together
            self._judge(Replicate.of(r["config"]).group)
        if rep.value is not None and math.isfinite(rep.value):
            r["best"] = rep.value if r["best"] is None else min(r["best"], rep.value)
        self._dirty = True

    def _judge(self, group: int) -> None:
        """The rung cells of one configuration's seeds: what ASHA compared at the last milestone each reached
        (`record.trial_report.judged_rungs`: each seed at the EMA the seeds choose together)."""
        try:
            self._judge_cells(group)
        except Exception:  # a malformed report is not the console's to judge (and never raises into Tune)
            pass

    def _judge_cells(self, group: int) -> None:
        mine = {tid: r for tid, r in self._rows.items() if Replicate.of(r["config"]).group == group}
        cells = judged_rungs({k: r.get("judged", {}) for k, r in mine.items()},
                             {k for k, r in mine.items() if r["state"] in ("DIVERGED", "ERROR")},
                             getattr(self, "milestones", []))
        for k, (p, name, value) in cells.items():
            mine[k]["rung"] = f"{p:,}: {name} {_fmt(value)}"

    def on_trial_complete(self, iteration, trials, trial, **info):
        res = trial.last_result or {}
        r = self._row(trial)
        r["state"] = ("DIVERGED" if res.get("diverged") else "TERMINATED" if res.get("final") else
                      "STOPPED (ASHA)")
        self._judge(Replicate.of(r["config"]).group)
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info):
        r = self._row(trial)
        r["state"] = "ERROR"
        self._judge(Replicate.of(r["config"]).group)  # a seed that raised counts as +inf at the rungs it missed
        self._print()

    def on_step_end(self, iteration, trials, **info):
        if self._dirty and time.monotonic() - self._last >= self.interval:
            self._print()

    def table(self) -> str:
        keys = [k for k in self.params]
        header = ["trial", "config", "seed"] + [k.split(".")[-1] for k in keys] + [
            "state", "images", "last rung judged", f"best {self.metric}"]
        rows = []
        for r in self._rows.values():
            c = r["config"]
            rows.append([r["name"], *Replicate.of(c).shown] + [_fmt(c.get(k)) for k in keys]
                        + [r["state"], f"{r['images']:,}/{self.max_images:,}", r["rung"] or "-", _fmt(r["best"])])
        best = min((r for r in self._rows.values() if r["best"] is not None), key=lambda r: r["best"], default=None)
        if best is None:
            return f"best so far: no {self.metric} yet\n" + format_table(header, rows)
        values = ", ".join(f"{k.split('.')[-1]}={_fmt(best['config'].get(k))}" for k in keys)
        head = (f"best so far: configuration {Replicate.of(best['config']).shown[0]} ({values}) {self.metric} "
                f"{_fmt(best['best'])}")
        return head + "\n" + format_table(header, rows)

    def _print(self) -> None:
        try:
            print(self.table(), file=self.stream or sys.stdout, flush=True)
        except Exception:  # the console never stops a sweep
            pass
        self._last, self._dirty = time.monotonic(), False
