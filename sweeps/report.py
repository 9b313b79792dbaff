"""What a trial reports to Ray Tune, in one typed place (written by the trainable; read by the scheduler, the
searcher, the MLflow tracker and the results reader).

A report is made at each evaluation point. The sweep metric is always present and always a number the scheduler
and searcher can compare: a NaN or infinite value is reported as +inf (the worst) with `nonfinite_metric = 1`, so
ASHA stops such a trial (NaN comparisons are always false) and the searcher sees the worst result.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

GROUP_KEY = "p2sweep_group"   # config key: the configuration a trial belongs to (its seeds share it)
SCORE = "ckpt_score"          # checkpoint ranking attribute: the sweep metric, +inf when not finite
# fields of a result that are not evaluation numbers (ours and Tune's)
RESERVED = {"images_seen", "final", "diverged", "nonfinite_metric", SCORE, "loss", "training_iteration",
            "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore", "iterations_since_restore",
            "done", "node_ip", "train_log", "diverged_reason", "trial_id", "date", "hostname", "checkpoint_dir_name",
            "should_checkpoint", "experiment_tag", "reported_at"}


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
    value: float
    images_seen: int
    final: bool = False
    diverged: bool = False
    nonfinite_metric: bool = False
    evals: dict = field(default_factory=dict)       # every metric name evaluated at this point -> value
    train_log: list = field(default_factory=list)   # training log records since the previous report
    node_ip: str = ""
    diverged_reason: str = ""
    checkpoint: str = ""                              # Tune's checkpoint dir name (set by Tune, read back only)

    @classmethod
    def make(cls, metric: str, value, images_seen: int, **kw) -> "TrialReport":
        v, bad = finite_or_inf(value)
        evals = {k: finite_or_inf(x)[0] for k, x in (kw.pop("evals", None) or {}).items()}
        return cls(metric=metric, value=v, images_seen=int(images_seen), nonfinite_metric=bad, evals=evals, **kw)

    def to_result(self) -> dict:
        r = {**self.evals, self.metric: self.value, SCORE: self.value, "images_seen": self.images_seen,
             "final": int(self.final), "diverged": int(self.diverged), "nonfinite_metric": int(self.nonfinite_metric),
             "train_log": json.dumps(self.train_log), "node_ip": self.node_ip, "reported_at": time.time()}
        if self.train_log:
            r["loss"] = self.train_log[-1].get("loss")
        if self.diverged_reason:
            r["diverged_reason"] = self.diverged_reason
        return r

    @classmethod
    def from_result(cls, metric: str, r: dict) -> "TrialReport":
        v, bad = finite_or_inf(r.get(metric))
        try:
            log = json.loads(r.get("train_log") or "[]")
        except (TypeError, json.JSONDecodeError):
            log = []
        return cls(metric=metric, value=v, images_seen=int(r.get("images_seen", 0) or 0), final=bool(r.get("final")),
                   diverged=bool(r.get("diverged")), nonfinite_metric=bool(r.get("nonfinite_metric")) or bad,
                   evals={k: finite_or_inf(x)[0] for k, x in r.items() if k not in RESERVED and k != metric
                          and isinstance(x, (int, float)) and not isinstance(x, bool)} | {metric: v},
                   train_log=log, node_ip=str(r.get("node_ip", "")), diverged_reason=str(r.get("diverged_reason", "")),
                   checkpoint=str(r.get("checkpoint_dir_name") or ""))

    @property
    def failed_value(self) -> bool:
        return self.diverged or self.nonfinite_metric
