"""What a trial reports to Ray Tune, in one typed place (written by the trainable; read by the scheduler, the
searcher, the MLflow tracker and the results reader).

A report is made at each evaluation point. Multi-fidelity rungs (`scheduler.rung_metrics`) mean that a point may be
judged on a cheaper metric than the sweep metric, so a report carries two numbers:
- `rung_score` with `rung_metric`: the value the scheduler (ASHA) and Optuna's intermediate values use at this
  point: the rung's own metric at a low rung, else the sweep metric. All trials use the same metric at a given
  rung, so ASHA compares like with like.
- with `scheduler.ema_rule: best`, `rung_candidates`: the rung metric of the tracked and every post-hoc EMA; a
  configuration is then judged on the EMA with the lowest mean over its seeds (`group_score`), by ASHA and Optuna;
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

from ..compat import CHECKPOINT_DIR_NAME, TUNE_RESULT_KEYS

SCORE = "ckpt_score"          # checkpoint ranking attribute: the sweep metric, +inf when not finite or not evaluated
RUNG_SCORE = "rung_score"     # what ASHA and Optuna's intermediate values compare at this point
RUNG_METRIC = "rung_metric"   # the metric name of rung_score
# fields of a result that are not evaluation numbers (ours and Tune's)
RESERVED = {"images_seen", "final", "diverged", "nonfinite_metric", SCORE, "loss", "node_ip", "node", "reference",
            "train_log", "diverged_reason", "reported_at", "gpus", "device", RUNG_SCORE, RUNG_METRIC, "points",
            "rung_candidates",
            *TUNE_RESULT_KEYS}


def group_choice(values) -> tuple[float, str | None]:
    """(score, EMA) of one configuration at a rung from its seeds' values: their mean (+inf if one is not finite),
    EMA None. Where the values are EMA candidates ({ema: value}, scheduler.ema_rule best): the mean over the seeds
    of each EMA that every seed has, then the lowest of those means and its EMA: one EMA for the whole
    configuration, as `best` chooses. A plain +inf (a seed that raised) stands for every EMA; a plain finite value
    is the tracked EMA's."""
    import numpy as np

    vals = list(values)
    if any(isinstance(v, dict) for v in vals):
        from p2core.metrics import TRACKED

        ds = [v if isinstance(v, dict) else None if not math.isfinite(v) else {TRACKED: v} for v in vals]
        have = [d for d in ds if d is not None]
        if not have:
            return math.inf, None
        keys = set(have[0]).intersection(*have[1:])
        at = lambda d, k: math.inf if d is None else d[k]
        scored = [(group_choice([at(d, k) for d in ds])[0], k) for k in sorted(keys)]
        return min(scored, default=(math.inf, None))
    return (float(np.mean(vals)) if vals and all(math.isfinite(v) for v in vals) else math.inf), None


def group_score(values) -> float:
    """`group_choice`'s score."""
    return group_choice(values)[0]


def judged_at(values: dict) -> dict:
    """What ASHA compared for each seed of one configuration at one rung: {key: (metric suffix EMA, value)} from
    {key: judged} (a report's `judged`: its EMA candidates under scheduler.ema_rule best, else its rung score). With
    candidates, each seed's value is the one at the EMA `group_choice` picks for the seeds together (None for the
    tracked one); a plain value stands as it is."""
    from p2core.metrics import TRACKED

    _, ema = group_choice(values.values())
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            pick = ema if ema in v else TRACKED
            out[k] = (None if pick == TRACKED else pick, finite_or_inf(v.get(pick))[0])
        else:
            out[k] = (None, v)
    return out


def rung_view(reports: dict, ended: set, milestone: int) -> dict:
    """What ASHA compared for one configuration at `milestone`, as GroupASHA records it: each seed's first report at
    or after the milestone (a seed that got there first trains on to its next report), a seed in `ended` (diverged
    or raised before it) as +inf, and under scheduler.ema_rule best one EMA for all (`judged_at`). `reports`: {key:
    {images_seen: (rung metric, judged)}}. Returns {key: (images_seen, rung metric, EMA or None, value)} for the
    seeds that reached it."""
    vals, at = {}, {}
    for k, reps in reports.items():
        p = min((i for i in reps if i >= milestone), default=None)
        if p is not None:
            at[k], vals[k] = p, reps[p][1]
        elif k in ended:
            vals[k] = math.inf
    judged = judged_at(vals)
    return {k: (p, reports[k][p][0], *judged[k]) for k, p in at.items()}


def judged_rungs(reports: dict, failed: set, milestones: list) -> dict:
    """Under scheduler.ema_rule best, what ASHA compared for each seed of one configuration at the last milestone it
    reached (`rung_view`): {key: (images_seen, rung metric named with the EMA, value)}; {} under the tracked rule,
    where each seed's own rung value is what ASHA compares. `reports`: {key: {images_seen: (rung metric, judged)}};
    `failed`: the seeds that diverged or raised (+inf at the milestones they did not reach). The one rule of
    `status`, the report and the console."""
    from p2core.metrics import with_ema

    if not any(isinstance(j, dict) for reps in reports.values() for _, j in reps.values()):
        return {}
    out = {}
    for k, reps in reports.items():
        m = max((x for x in milestones if reps and x <= max(reps)), default=None)
        if m is None:
            continue
        ended = {j for j in failed if max(reports.get(j) or {0: None}) < m}
        view = rung_view(reports, ended, m).get(k)
        if view is not None:
            p, rm, ema, value = view
            out[k] = (p, rm if ema is None else with_ema(rm, ema), value)
    return out


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
    gpus: str = ""                                    # the GPU ids Ray gave the trial (its CUDA_VISIBLE_DEVICES)
    device: str = ""                                  # the torch device it trained on ("cuda", "cpu")
    diverged_reason: str = ""
    checkpoint: str = ""                              # Tune's checkpoint dir name (set by Tune, read back only)
    rung_metric: str = ""                             # "" = the sweep metric
    rung_value: float = math.inf
    # scheduler.ema_rule best: the rung metric of every EMA ({"tracked": v, "0.07": v, ...}); the scheduler and the
    # searcher take, per configuration, the EMA of the lowest mean over the seeds (`group_score`)
    rung_candidates: dict = field(default_factory=dict)

    @classmethod
    def make(cls, metric: str, value, images_seen: int, *, evaluated: bool = True, rung_metric: str = "",
             rung_value=None, **kw) -> "TrialReport":
        """`evaluated=False`: the sweep metric was not computed at this point (a low rung judged on rung_metric)."""
        v, bad = finite_or_inf(value) if evaluated else (None, False)
        rv, rbad = finite_or_inf(rung_value) if rung_metric and rung_metric != metric else (v, bad)
        evals = {k: finite_or_inf(x)[0] for k, x in (kw.pop("evals", None) or {}).items()}
        if kw.get("rung_candidates"):
            kw["rung_candidates"] = {str(k): finite_or_inf(x)[0] for k, x in kw["rung_candidates"].items()}
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
             "reference": self.reference, "gpus": self.gpus, "device": self.device,
             "reported_at": time.time()}
        if self.value is not None:
            r[self.metric] = self.value
        if self.train_log:
            r["loss"] = self.train_log[-1].get("loss")
        if self.diverged_reason:
            r["diverged_reason"] = self.diverged_reason
        if self.rung_candidates:
            r["rung_candidates"] = json.dumps(self.rung_candidates)  # a string: Tune would flatten a dict
        return r

    @property
    def judged(self):
        """What the scheduler and the searcher compare for this report: the rung score, or the EMA candidates."""
        return dict(self.rung_candidates) if self.rung_candidates else self.rung_value

    @classmethod
    def from_result(cls, metric: str, r: dict) -> "TrialReport":
        evaluated = metric in r or bool(r.get("diverged"))
        v, bad = finite_or_inf(r.get(metric)) if evaluated else (None, False)
        try:
            log = json.loads(r.get("train_log") or "[]")
        except (TypeError, json.JSONDecodeError):
            log = []
        rung_metric = str(r.get(RUNG_METRIC) or metric)
        try:
            cands = {str(k): finite_or_inf(v)[0] for k, v in json.loads(r.get("rung_candidates") or "{}").items()}
        except (TypeError, ValueError, AttributeError):
            cands = {}
        rung_value = finite_or_inf(r[RUNG_SCORE])[0] if RUNG_SCORE in r else (math.inf if v is None else v)
        evals = {k: finite_or_inf(x)[0] for k, x in r.items() if k not in RESERVED and k != metric
                 and isinstance(x, (int, float)) and not isinstance(x, bool)}
        if v is not None:
            evals[metric] = v
        return cls(metric=metric, value=v, images_seen=int(r.get("images_seen", 0) or 0), final=bool(r.get("final")),
                   diverged=bool(r.get("diverged")), nonfinite_metric=bool(r.get("nonfinite_metric")) or bad,
                   evals=evals, train_log=log, node_ip=str(r.get("node_ip", "")), node=str(r.get("node", "")),
                   reference=str(r.get("reference", "")), gpus=str(r.get("gpus", "")), device=str(r.get("device", "")),
                   diverged_reason=str(r.get("diverged_reason", "")), checkpoint=str(r.get(CHECKPOINT_DIR_NAME) or ""),
                   rung_metric=rung_metric, rung_value=rung_value, rung_candidates=cands)

    @property
    def failed_value(self) -> bool:
        return self.diverged or self.nonfinite_metric
