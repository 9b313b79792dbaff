"""The numbers of a sweep report (no Ray, no plotting): arms, curves over seeds, paired comparisons against the
baseline arm, loss per SNR phase, cost. Pure functions of the trials that `results.load_trials` reads.

Statistics: a comparison pairs the seeds two arms share at the same point in training and gives the mean
difference with a two-sided 95% Student t-interval over the paired differences (n - 1 degrees of freedom). With
3 seeds that is 2 degrees of freedom (t = 4.303): wide, but honest; a bootstrap over 3 values is degenerate.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

from p2core.metrics import CHOSEN, family_of, parse_metric_name, split_ema, steps_from_label
from p2core.weighting import SNR_PHASE_NAMES

from ..record.replicate import trial_config
from .trials import Trial, read_results

GAMMA, K, SCHEDULE = "diffusion.p2_gamma", "diffusion.p2_k", "diffusion.noise_schedule"
PHASE_NAMES = SNR_PHASE_NAMES  # the trainer logs loss_<name> for each (p2core.weighting.SNR_PHASES)


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student t-interval of the mean; low/high are NaN below 2 values."""
    from scipy.stats import t

    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = statistics.fmean(vals)
    if n < 2:
        return m, math.nan, math.nan
    half = float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(vals) / math.sqrt(n)
    return m, m - half, m + half


@dataclass
class Comparison:
    """An arm against its baseline arm on one metric at one point: diff = arm - baseline, paired by seed."""
    metric: str
    arm: int
    baseline: int
    images_seen: int
    seeds: list
    arm_values: list
    baseline_values: list
    diff: float
    low: float
    high: float
    seeds_expected: int = 0
    nonfinite: int = 0   # seeds of either arm whose value at this point was NaN/inf (diverged): not paired
    baseline_metric: str = ""  # the baseline's metric where it differs from the arm's (each at its own best EMA)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def distinguishable(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and (self.low > 0 or self.high < 0)

    def sentence(self, arm_label: str, lower_is_better: bool = True) -> str:
        plain, ema = split_ema(self.metric)
        kind, n, spec = parse_metric_name(plain)
        if self.baseline_metric and self.baseline_metric != self.metric:
            what = (f"{kind.upper()}-{n} ({spec}; each at its own best EMA: {ema_words(self.metric)} against the "
                    f"baseline's {ema_words(self.baseline_metric)})")
        else:
            what = f"{kind.upper()}-{n} ({spec}" + ("" if ema is None else f", {ema_words(self.metric)}") + ")"
        if self.n < 2:
            return (f"{arm_label}: {what} {self.diff:+.3g} against the baseline with {self.n} paired seed at "
                    f"{self.images_seen:,} images: no interval (at least 2 seeds are needed)")
        better = self.diff < 0 if lower_is_better else self.diff > 0
        word = "lower" if self.diff < 0 else "higher"
        # the interval of the size of the difference in the direction the sentence names
        ci = f"[{-self.high:.3g}, {-self.low:.3g}]" if self.diff < 0 else f"[{self.low:.3g}, {self.high:.3g}]"
        seeds = f"{self.n} seeds" + (f" of {self.seeds_expected}" if self.seeds_expected > self.n else "")
        s = (f"{arm_label}: {what} {word} than the baseline by {abs(self.diff):.3g} {ci} (95% t-interval), "
             f"{seeds}, at {self.images_seen:,} images")
        if self.nonfinite:
            return s + f"; {self.nonfinite} seed value(s) diverged or not finite and left out: no verdict"
        if not self.distinguishable:
            return s + ": not distinguishable from seed noise"
        return s + (": better than the baseline" if better else ": worse than the baseline")

    def to_dict(self) -> dict:
        return {**asdict(self), "n": self.n, "distinguishable": self.distinguishable}


def group_key(t: Trial):
    """A trial's configuration: its group, or its values when it carries none (`Trial.config_key`, as the ranking)."""
    return t.config_key


def groups_of(trials: list[Trial]) -> dict:
    """{configuration key: [trials]} in group order."""
    out: dict = {}
    for t in sorted(trials, key=lambda t: (t.group, t.seed)):
        out.setdefault(group_key(t), []).append(t)
    return out


def baseline_of(params: dict, all_params: dict) -> int | None:
    """The group of the baseline arm of `params`: p2_gamma = 0 and every other swept value equal (p2_k aside: it
    does nothing at gamma 0). None when the arm is a baseline itself or none was swept."""
    if GAMMA not in params or float(params[GAMMA]) == 0.0:
        return None
    rest = {k: v for k, v in params.items() if k not in (GAMMA, K)}
    for g, p in all_params.items():
        if GAMMA in p and float(p[GAMMA]) == 0.0 and {k: v for k, v in p.items() if k not in (GAMMA, K)} == rest:
            return g
    return None


def arm_label(params: dict, base: dict) -> str:
    """'P2 gamma=1, k=1, linear' / 'baseline (gamma=0), cosine', then any other swept value (`base`: the sweep's
    base config; the arm's own validated config gives what `params` does not set)."""
    d = trial_config(base, params).diffusion
    gamma, k, sched = d.p2_gamma, d.p2_k, d.noise_schedule
    if d.weighting != "p2" and GAMMA not in params:
        head = d.weighting
    else:
        head = "baseline (gamma=0)" if gamma == 0 else f"P2 gamma={gamma:g}, k={k:g}"
    rest = [f"{k_.split('.')[-1]}={v}" for k_, v in sorted(params.items()) if k_ not in (GAMMA, K, SCHEDULE)]
    return ", ".join([head, str(sched)] + rest)


def family(trials: list[Trial], metric: str) -> list[str]:
    """The metric names of the sweep metric's family (same kind and sample count: one per sampling spec)."""
    return family_of((k for t in trials for ev in t.points.values() for k in ev), metric)


def curve(trials: list[Trial], name: str) -> list[dict]:
    """[{images_seen, mean, min, max, seeds, values}] of one configuration's seeds, at each point where any seed has
    a finite `name` (the mean is over the seeds present there)."""
    pts: dict = {}
    for t in trials:
        for p, ev in t.points.items():
            v = ev.get(name)
            if v is not None and math.isfinite(v):
                pts.setdefault(p, []).append((t.seed, v))
    out = []
    for p in sorted(pts):
        sv = sorted(pts[p])
        vals = [v for _, v in sv]
        out.append({"images_seen": p, "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                    "seeds": [s for s, _ in sv], "values": vals})
    return out


def ema_words(name: str) -> str:
    e = split_ema(name)[1]
    if e == CHOSEN:
        return "the EMA each seed's cheap metric chose (eval.ema_choose_on)"
    return "the tracked EMA" if e is None else f"EMA sigma_rel {e:g}"


def compare(arm_trials: list[Trial], base_trials: list[Trial], name: str, arm, base,
            seeds_expected: int = 0, base_name: str | None = None) -> list[Comparison]:
    """One paired comparison per point in training where both arms have `name` (the baseline: `base_name`, default
    the same) for at least one shared seed."""
    bn = base_name or name
    a = {(t.seed, p): ev[name] for t in arm_trials for p, ev in t.points.items() if name in ev}
    b = {(t.seed, p): ev[bn] for t in base_trials for p, ev in t.points.items() if bn in ev}
    out = []
    for p in sorted({p for _, p in a} & {p for _, p in b}):
        shared = sorted(s for s, q in a if q == p and (s, p) in b)
        seeds = [s for s in shared if math.isfinite(a[s, p]) and math.isfinite(b[s, p])]
        bad = sum(not math.isfinite(x[s, p]) for x in (a, b) for s, q in x if q == p)
        if not shared:
            continue
        av, bv = [a[s, p] for s in seeds], [b[s, p] for s in seeds]
        m, lo, hi = t_interval([x - y for x, y in zip(av, bv)]) if seeds else (math.nan,) * 3
        out.append(Comparison(name, arm, base, p, seeds, av, bv, m, lo, hi, seeds_expected, bad,
                              "" if bn == name else bn))
    return out


def headline(comps: list[Comparison]) -> Comparison | None:
    """The comparison a sentence leads with: the point with the most paired seeds, the latest on a tie."""
    return max(comps, key=lambda c: (c.n, c.images_seen), default=None)


def verdict(c: Comparison | None) -> str:
    if c is None or c.n < 2 or c.nonfinite or not math.isfinite(c.low):  # as the sentence: a NaN seed withholds it
        return "no verdict"
    return "better" if c.high < 0 else "worse" if c.low > 0 else "not distinguishable"


def own_best_ema(arm_trials: list[Trial], base_trials: list[Trial], names: list[str], mean_of, arm, base,
                 seeds_expected: int = 0, arm_label: str = "") -> list[dict]:
    """For each sampling spec whose metric has post-hoc EMAs among `names`: the arm against its baseline at one
    common EMA (the tracked one) and with each at its own best EMA (the name of lowest `mean_of(group, name)`, the
    row mean `best` shows), and whether the verdict (better / worse / not distinguishable) changes. Choosing each
    arm's minimum is optimistic for both alike. Each entry's `sentence` words the own-best comparison for
    `arm_label` (default: the arm's key)."""
    out = []
    for plain in sorted({split_ema(n)[0] for n in names if split_ema(n)[1] is not None}):
        cands = [n for n in names if split_ema(n)[0] == plain]
        pick = {}
        for g in (arm, base):
            have = [(mean_of(g, n), n) for n in cands if mean_of(g, n) is not None and math.isfinite(mean_of(g, n))]
            if have:
                pick[g] = min(have)[1]
        if len(pick) < 2:
            continue
        common = headline(compare(arm_trials, base_trials, plain, arm, base, seeds_expected))
        best = headline(compare(arm_trials, base_trials, pick[arm], arm, base, seeds_expected, base_name=pick[base]))
        if best is None:
            continue
        out.append({"spec_metric": plain, "arm": arm, "baseline": base, "arm_metric": pick[arm],
                    "baseline_metric": pick[base], "common": common.to_dict() if common else None,
                    "own_best": best.to_dict(), "common_verdict": verdict(common), "own_best_verdict": verdict(best),
                    "verdict_changes": verdict(common) != verdict(best),
                    "sentence": best.sentence(arm_label or str(arm))})
    return out


@dataclass
class TrialCost:
    trial_id: str
    group: int
    seed: int
    state: str
    node: str
    images_trained: int
    images_generated: int = 0          # for evaluation (all sampling specs and points); each also goes through
    image_steps: int = 0               # images x sampling steps                           the feature network once
    train_seconds: float = 0.0         # the trial's time minus its evaluations
    sample_seconds: float = 0.0
    feature_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0          # Tune's time_total_s along the kept path (work redone after a crash is not)


def steps_of(spec: str) -> int:
    """Denoising steps of a sampling spec, as a config or a result key writes it ("ddim25" -> 25, "250" -> 250,
    section counts "50,25,25" or "50-25-25" -> 100; a reconstructed EMA's "ddim25_ema0.07" costs the same steps)."""
    from p2core.respace import parse_respacing

    s = parse_respacing(steps_from_label(split_ema(spec)[0]))
    return int(s[4:]) if s.startswith("ddim") else sum(int(x) for x in s.split(","))


def trial_rows(t: Trial) -> list[dict]:
    """The trial's reports (result.json), one per point in training (a resumed trial's later report wins)."""
    import os

    by_point: dict = {}
    for r in read_results(os.path.join(t.dir, "result.json")) if t.dir else []:
        by_point[int(r.get("images_seen", 0) or 0)] = r
    return [by_point[k] for k in sorted(by_point)]


def generations(row: dict) -> list:
    """[(spec label, images generated)] of one report: every EMA's generations ("ddim10_ema0.05") and the tracked
    EMA's score for eval.ema_choose_on ("choose_gen_images_ddim10") included."""
    return [(k.split("gen_images_", 1)[1], int(v)) for k, v in row.items()
            if k.startswith(("gen_images_", "choose_gen_images_")) and isinstance(v, (int, float))]


def trial_cost(t: Trial, rows: list[dict]) -> TrialCost:
    c = TrialCost(t.trial_id, t.group, t.seed, t.state, t.node_ip, t.images_seen)
    for r in rows:
        for spec, n in generations(r):
            c.images_generated += n
            c.image_steps += n * steps_of(spec)
        for k, v in r.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            k = k[len("choose_"):] if k.startswith("choose_") else k  # eval.ema_choose_on's tracked-EMA score
            if k.startswith("gen_seconds_"):
                c.sample_seconds += v
            elif k.startswith("feat_seconds_"):
                c.feature_seconds += v
            elif k == "eval_seconds":
                c.eval_seconds += v
    if rows:
        c.wall_seconds = float(rows[-1].get("time_total_s", 0.0) or 0.0)
    c.train_seconds = max(0.0, c.wall_seconds - c.eval_seconds)
    return c


def phase_losses(rows: list[dict]) -> list[dict]:
    """[{images_seen, coarse, content, cleanup}] from the training log records the reports carry: the training
    loss (as weighted by the arm's own weighting) per SNR phase."""
    import json

    by_point: dict = {}
    for r in rows:
        try:
            log = json.loads(r.get("train_log") or "[]")
        except (TypeError, ValueError):
            continue
        for rec in log:
            vals = {p: rec.get(f"loss_{p}") for p in PHASE_NAMES}
            if "images_seen" in rec and any(v is not None for v in vals.values()):
                by_point[int(rec["images_seen"])] = vals
    return [{"images_seen": p, **by_point[p]} for p in sorted(by_point)]


def mean_phase_curve(per_seed: list[list[dict]]) -> list[dict]:
    """Mean over the seeds that logged each point (`n` says how many)."""
    points = sorted({r["images_seen"] for s in per_seed for r in s})
    out = []
    for p in points:
        rows = [r for s in per_seed for r in s if r["images_seen"] == p]
        row = {"images_seen": p, "n": len(rows)}
        for ph in PHASE_NAMES:
            vals = [r[ph] for r in rows if r.get(ph) is not None]
            row[ph] = statistics.fmean(vals) if vals else None
        out.append(row)
    return out


@dataclass
class CostSummary:
    trials: list = field(default_factory=list)
    images_trained: int = 0
    images_if_all_to_end: int = 0      # images_trained plus what the trials ASHA stopped would have trained
    images_generated: int = 0
    image_steps: int = 0
    train_seconds: float = 0.0
    sample_seconds: float = 0.0
    feature_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def early_stop_saved(self) -> float:
        """The fraction of training images that early stopping saved against every trial trained to the end."""
        if not self.images_if_all_to_end:
            return 0.0
        return 1.0 - self.images_trained / self.images_if_all_to_end


def cost_summary(costs: list[TrialCost], max_images: int) -> CostSummary:
    s = CostSummary(trials=costs)
    for c in costs:
        s.images_trained += c.images_trained
        s.images_generated += c.images_generated
        s.image_steps += c.image_steps
        s.train_seconds += c.train_seconds
        s.sample_seconds += c.sample_seconds
        s.feature_seconds += c.feature_seconds
        s.wall_seconds += c.wall_seconds
    # only early stopping's shortfall: diverged, errored and unfinished trials saved nothing
    s.images_if_all_to_end = s.images_trained + sum(max(0, max_images - c.images_trained) for c in costs
                                                    if c.state == "STOPPED")
    return s
