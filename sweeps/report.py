"""What a trial reports to Ray Tune, in one typed place (written by the trainable; read by the scheduler, the
searcher, the MLflow tracker and the results reader).

A report is made at each evaluation point. Multi-fidelity rungs (`scheduler.rung_metrics`) mean that a point may be
judged on a cheaper metric than the sweep metric, so a report carries two numbers:
- `rung_score` with `rung_metric`: the value the scheduler (ASHA) and Optuna's intermediate values use at this
  point: the rung's own metric at a low rung, else the sweep metric. All trials use the same metric at a given
  rung, so ASHA compares like with like.
- the sweep metric under its own name, only where it was evaluated (None otherwise); `ckpt_score` is that value, or
  +inf where it was not evaluated, so the best checkpoint, `best`, the plots and the final ranking only ever compare
  the sweep metric.
A NaN or infinite value is reported as +inf (the worst) with `nonfinite_metric = 1`, so ASHA stops such a trial
(NaN comparisons are always false) and the searcher sees the worst result.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

GROUP_KEY = "p2sweep_group"   # config key: the configuration a trial belongs to (its seeds share it)
SCORE = "ckpt_score"          # checkpoint ranking attribute: the sweep metric, +inf when not finite or not evaluated
RUNG_SCORE = "rung_score"     # what ASHA and Optuna's intermediate values compare at this point
RUNG_METRIC = "rung_metric"   # the metric name of rung_score
# fields of a result that are not evaluation numbers (ours and Tune's)
RESERVED = {"images_seen", "final", "diverged", "nonfinite_metric", SCORE, "loss", "training_iteration",
            "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore", "iterations_since_restore",
            "done", "node_ip", "node", "reference", "train_log", "diverged_reason", "trial_id", "date", "hostname", "checkpoint_dir_name",
            "should_checkpoint", "experiment_tag", "reported_at", RUNG_SCORE, RUNG_METRIC, "points"}


def finite_or_inf(v) -> tuple[float, bool]:
    """(value, was_nonfinite): NaN/inf/None -> (+inf, True)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.inf, True
    return (x, False) if math.isfinite(x) else (math.inf, True)


@dataclass
class TrialReport:
    metric: str
    value: float | None                               # the sweep metric; None where it was not evaluated
    images_seen: int
    final: bool = False
    diverged: bool = False
    nonfinite_metric: bool = False
    evals: dict = field(default_factory=dict)       # every metric name evaluated at this point -> value
    train_log: list = field(default_factory=list)   # training log records since the previous report
    node_ip: str = ""
    node: str = ""                                    # the Ray node: its --node-name, else the start of its id
    reference: str = ""                               # where the trial's reference statistics came from
    diverged_reason: str = ""
    checkpoint: str = ""                              # Tune's checkpoint dir name (set by Tune, read back only)
    rung_metric: str = ""                             # "" = the sweep metric
    rung_value: float = math.inf

    @classmethod
    def make(cls, metric: str, value, images_seen: int, *, evaluated: bool = True, rung_metric: str = "",
             rung_value=None, **kw) -> "TrialReport":
        """`evaluated=False`: the sweep metric was not computed at this point (a low rung judged on rung_metric)."""
        v, bad = finite_or_inf(value) if evaluated else (None, False)
        rv, rbad = finite_or_inf(rung_value) if rung_metric and rung_metric != metric else (v, bad)
        evals = {k: finite_or_inf(x)[0] for k, x in (kw.pop("evals", None) or {}).items()}
        # nonfinite_metric: the sweep metric where it was evaluated, else the rung's own metric
        return cls(metric=metric, value=v, images_seen=int(images_seen), nonfinite_metric=bad if evaluated else rbad,
                   evals=evals,
                   rung_metric=rung_metric or metric, rung_value=math.inf if rv is None else rv, **kw)

    @property
    def evaluated(self) -> bool:
        return self.value is not None

    def to_result(self) -> dict:
        score = math.inf if self.value is None else self.value
        r = {**self.evals, SCORE: score, RUNG_SCORE: self.rung_value, RUNG_METRIC: self.rung_metric,
             "images_seen": self.images_seen,
             "final": int(self.final), "diverged": int(self.diverged), "nonfinite_metric": int(self.nonfinite_metric),
             "train_log": json.dumps(self.train_log), "node_ip": self.node_ip, "node": self.node,
             "reference": self.reference,
             "reported_at": time.time()}
        if self.value is not None:
            r[self.metric] = self.value
        if self.train_log:
            r["loss"] = self.train_log[-1].get("loss")
        if self.diverged_reason:
            r["diverged_reason"] = self.diverged_reason
        return r

    @classmethod
    def from_result(cls, metric: str, r: dict) -> "TrialReport":
        evaluated = metric in r or bool(r.get("diverged"))
        v, bad = finite_or_inf(r.get(metric)) if evaluated else (None, False)
        try:
            log = json.loads(r.get("train_log") or "[]")
        except (TypeError, json.JSONDecodeError):
            log = []
        rung_metric = str(r.get(RUNG_METRIC) or metric)
        rung_value = finite_or_inf(r[RUNG_SCORE])[0] if RUNG_SCORE in r else (math.inf if v is None else v)
        evals = {k: finite_or_inf(x)[0] for k, x in r.items() if k not in RESERVED and k != metric
                 and isinstance(x, (int, float)) and not isinstance(x, bool)}
        if v is not None:
            evals[metric] = v
        return cls(metric=metric, value=v, images_seen=int(r.get("images_seen", 0) or 0), final=bool(r.get("final")),
                   diverged=bool(r.get("diverged")), nonfinite_metric=bool(r.get("nonfinite_metric")) or bad,
                   evals=evals, train_log=log, node_ip=str(r.get("node_ip", "")), node=str(r.get("node", "")),
                   reference=str(r.get("reference", "")),
                   diverged_reason=str(r.get("diverged_reason", "")), checkpoint=str(r.get("checkpoint_dir_name") or ""),
                   rung_metric=rung_metric, rung_value=rung_value)

    @property
    def failed_value(self) -> bool:
        return self.diverged or self.nonfinite_metric
