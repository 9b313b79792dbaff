"""Reading a sweep back from its experiment directory (no Ray import): trials, status, ranking, export, CSV.

The trials of a sweep are the ones in Ray Tune's last saved experiment state (`experiment_state-*.json`), copied
to `p2sweep_trials.json` when a run or resume ends. A trial directory Tune does not know (the trial was started
after Tune's last save, then the driver died; Tune re-ran its configuration under a new id) is not a trial.
Each trial directory holds `result.json`, one JSON line per report (a `TrialReport`); a trial resumed from an older
checkpoint repeats some image counts, and the later report wins.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

from p2core.metrics import canonical_metric_name, is_metric_name, parse_metric_name

from . import storage as S
from .meta import STATES
from .report import GROUP_KEY, TrialReport

UNFINISHED = ("RUNNING", "PENDING", "PAUSED")


def read_results(path: str) -> list[dict]:
    """The reports in a trial's `result.json` (a local path or a storage URI); stops at a torn last line."""
    out = []
    for line in (S.read_text(path) or "").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def tune_states(d: str) -> dict:
    """{trial_id: {state, diverged, images_seen, config, dir, errors}} from the experiment state Tune saved last
    (saved before Tune tears its trials down, so an interrupted trial is still RUNNING there). States: TERMINATED
    (trained to the end), STOPPED (ended early by ASHA), DIVERGED, ERROR, or RUNNING/PENDING/PAUSED (interrupted)."""
    files = S.glob(d, "experiment_state-*.json")  # named by session start time
    text = S.read_text(files[-1]) if files else None
    if text is None:
        return {}
    data = json.loads(text)
    out = {}
    for item in data.get("trial_data", []):
        tr, rt = (json.loads(x) if isinstance(x, str) else x for x in item)
        m = rt.get("last_result") or {}
        st = tr.get("status", "PENDING")
        if st == "TERMINATED":
            st = "DIVERGED" if m.get("diverged") else "TERMINATED" if m.get("final") else "STOPPED"
        cfg = tr.get("config") or {}
        out[tr["trial_id"]] = {"state": st, "diverged": bool(m.get("diverged")),
                               "images_seen": int(m.get("images_seen", 0) or 0),
                               "config": {k: v for k, v in cfg.items() if isinstance(k, str)},
                               "dir": tr.get("relative_logdir") or "", "failures": int(rt.get("num_failures", 0))}
    return out


def known_states(d: str) -> dict:
    """Tune's view of the trials: the live experiment state when there is one, else the copy the driver kept."""
    st = tune_states(d)
    if st:
        return st
    text = S.read_text(S.join(d, STATES))
    return json.loads(text) if text else {}


@dataclass
class Trial:
    trial_id: str
    dir: str
    config: dict          # the trial's own values (group key and train.seed included)
    group: int
    seed: int
    state: str
    images_seen: int
    points: dict = field(default_factory=dict)       # images_seen -> {metric name: value}
    history: list = field(default_factory=list)      # [(images_seen, sweep metric)] where it was evaluated
    checkpoints: dict = field(default_factory=dict)  # images_seen -> checkpoint directory still on disk
    diverged: bool = False
    node_ip: str = ""
    node: str = ""         # the Ray nodes it reported from, in order ("node_b > 3f2a9c01" after a node was lost)
    last_rung: tuple = ()  # (images_seen, rung metric, rung score) of the last report: what ASHA judged last

    @property
    def params(self) -> dict:
        """The configuration's values without the bookkeeping (group) and the seed."""
        return {k: v for k, v in self.config.items() if k not in (GROUP_KEY, "train.seed")}

    @property
    def latest(self):
        return self.history[-1][1] if self.history else None

    @property
    def best(self):
        vals = [v for _, v in self.history if math.isfinite(v)]
        return min(vals) if vals else None


def load_trials(d: str, metric: str) -> list[Trial]:
    states = known_states(d)
    dirs = {}
    for rj in S.children_with(d, "result.json"):
        rows = read_results(rj)
        if rows:
            dirs[rows[0].get("trial_id")] = (S.dirname(rj), rows)
    ids = list(states) if states else sorted(dirs)
    trials = []
    for tid in ids:
        st = states.get(tid, {})
        tdir, rows = dirs.get(tid, (S.join(d, st.get("dir", "")) if st.get("dir") else "", []))
        by_point: dict = {}
        ckpts: dict = {}
        kept = set(S.glob(tdir, "checkpoint_*")) if tdir else set()  # one listing, not one request per report
        for r in rows:  # a resumed trial may repeat image counts: the later report wins
            rep = TrialReport.from_result(metric, r)
            by_point[rep.images_seen] = rep
            if rep.checkpoint and S.join(tdir, rep.checkpoint) in kept:
                ckpts[rep.images_seen] = S.join(tdir, rep.checkpoint)
        reps = [by_point[k] for k in sorted(by_point)]
        config = st.get("config") or (rows[0].get("config", {}) if rows else {})
        last = reps[-1] if reps else None
        state = st.get("state") or _state_from_files(last, tdir)
        if last is not None and last.diverged:
            state = "DIVERGED"
        trials.append(Trial(
            trial_id=tid, dir=tdir, config=config, group=int(config.get(GROUP_KEY, -1)),
            seed=int(config.get("train.seed", 0)), state=state,
            images_seen=max(last.images_seen if last else 0, int(st.get("images_seen", 0))),
            points={r.images_seen: dict(r.evals) for r in reps},
            history=[(r.images_seen, r.value) for r in reps if r.evaluated], checkpoints=ckpts,
            diverged=bool(last and last.diverged), node_ip=last.node_ip if last else "",
            node=" > ".join(_runs_of([r.node for r in reps if r.node])),
            last_rung=_last_rung(last, metric)))
    return trials


def _runs_of(xs: list) -> list:
    """[a, a, b, a] -> [a, b, a]: where a trial ran, in order."""
    return [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x]


def _last_rung(last, metric: str) -> tuple:
    if last is None:
        return ()
    rm, rv = last.rung_metric, last.rung_value
    if rm != metric and is_metric_name(rm) and canonical_metric_name(rm) == metric:
        rm, rv = metric, last.value  # a sweep that spelled its metric another way (kid1000 for kid1k)
    return last.images_seen, rm, rv


def _state_from_files(last, tdir) -> str:
    if last is None:
        return "PENDING"
    if last.diverged:
        return "DIVERGED"
    if last.final:
        return "TERMINATED"
    if tdir and S.exists(S.join(tdir, "error.txt")):
        return "ERROR"
    return "STOPPED"


def rung_history(d: str, metric: str) -> list[tuple]:
    """[(trial_id, group, images_seen, rung score, ended)] of every report of the known trials, in time order, then a row
    (trial_id, group, None, None, True) for each trial that ended in ERROR (ASHA's rung records are rebuilt from
    them on resume)."""
    known = known_states(d)
    out = []
    for rj in S.children_with(d, "result.json"):
        for r in read_results(rj):
            if known and r.get("trial_id") not in known:
                continue
            rep = TrialReport.from_result(metric, r)
            g = int((r.get("config") or {}).get(GROUP_KEY, -1))
            out.append((r.get("reported_at", r.get("timestamp", 0)), r["trial_id"], g, rep.images_seen,
                        rep.rung_value, rep.diverged))
    errored = [(tid, int(st.get("config", {}).get(GROUP_KEY, -1))) for tid, st in known.items()
               if st.get("state") == "ERROR"]
    return [x[1:] for x in sorted(out, key=lambda x: x[0])] + [(tid, g, None, None, True) for tid, g in errored]


# -- status -----------------------------------------------------------------------------------------------------

def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def status_rows(trials: list[Trial], metric: str):
    keys = sorted({k for t in trials for k in t.params})
    header = ["trial", "config", "seed"] + keys + ["state", "images", f"latest {metric}", f"best {metric}", "node"]
    # multi-fidelity: a trial stopped at a low rung has no sweep-metric value; say what it was judged on
    low = any(t.last_rung and t.last_rung[1] != metric for t in trials)
    if low:
        header.append("last rung judged on")
    rows = []
    for t in trials:
        state = t.state + (" (kept; resume --retry-errored retries it)" if t.state == "ERROR" else "")
        row = ([t.trial_id, str(t.group), str(t.seed)] + [_fmt(t.params.get(k)) for k in keys] +
               [state, str(t.images_seen), _fmt(t.latest), _fmt(t.best), t.node or t.node_ip or "-"])
        if low:
            r = t.last_rung
            row.append(f"{r[1]} = {_fmt(r[2])} at {r[0]}" if r and r[1] != metric else "-")
        rows.append(row)
    return header, rows


# -- ranking ----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One (configuration, sampling spec) of a sweep, over the seeds that reached the same point in training."""
    group: int
    config: dict              # params without seed
    spec: str
    metric: str               # the metric name of this row (same kind and n as the sweep metric)
    images_seen: int          # the point in training all counted seeds share
    values: list              # per counted seed
    seeds: list
    trials: list
    checkpoints: list         # per counted seed: checkpoint dir at that point, or ""
    seeds_expected: int
    full_length: bool
    mean: float = math.inf
    std: float = 0.0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def lost(self) -> int:
        """Seeds of the configuration not counted here (stopped at another point, diverged, raised, not run)."""
        return self.seeds_expected - self.n

    @property
    def complete(self) -> bool:
        return self.full_length and self.lost == 0 and all(math.isfinite(v) for v in self.values)

    def rank_key(self):
        # complete rows first; then rows with every seed (trained less far); rows that lost seeds last
        return (not self.complete, self.lost > 0, math.isinf(self.mean), self.mean)


def _common_point(trials: list[Trial], name: str) -> tuple[int | None, list[Trial]]:
    """The point in training where most seeds have `name` (the latest such point on a tie)."""
    counts: dict = {}
    for t in trials:
        for p, ev in t.points.items():
            if name in ev:
                counts.setdefault(p, []).append(t)
    if not counts:
        return None, []
    p = max(counts, key=lambda k: (len(counts[k]), k))
    return p, counts[p]


def _best_point(trials: list[Trial], metric: str) -> int | None:
    """The point where the mean of the sweep metric over the most seeds is lowest (for --scope best)."""
    counts: dict = {}
    for t in trials:
        for p, ev in t.points.items():
            if metric in ev:
                counts.setdefault(p, []).append(ev[metric])
    if not counts:
        return None
    most = max(len(v) for v in counts.values())
    cands = {p: statistics.fmean(v) if all(math.isfinite(x) for x in v) else math.inf
             for p, v in counts.items() if len(v) == most}
    return min(cands, key=lambda p: (cands[p], -p))


def group_rows(trials: list[Trial], metric: str, max_images: int, seeds_expected: int,
               scope: str = "last") -> list[Row]:
    """One row per (configuration, sampling spec) in the sweep metric's family (same kind and n), ranked.
    `scope=last`: each spec at the latest point its seeds share; `scope=best`: every spec of a configuration at the
    one point where the sweep metric's mean was best."""
    kind, n, _ = parse_metric_name(metric)
    groups: dict = {}
    for t in trials:
        groups.setdefault(t.group if t.group >= 0 else json.dumps(t.params, sort_keys=True), []).append(t)
    rows = []
    for g, ts in groups.items():
        names = sorted({k for t in ts for ev in t.points.values() for k in ev
                        if is_metric_name(k) and parse_metric_name(k)[:2] == (kind, n)})
        fixed = _best_point(ts, metric) if scope == "best" else None
        for name in names:
            if fixed is not None:
                p, used = fixed, [t for t in ts if name in t.points.get(fixed, {})]
                if not used:
                    continue
            else:
                p, used = _common_point(ts, name)
            used = sorted(used, key=lambda t: t.seed)
            vals = [t.points[p][name] for t in used]
            row = Row(group=ts[0].group, config=ts[0].params, spec=parse_metric_name(name)[2], metric=name,
                      images_seen=p, values=vals, seeds=[t.seed for t in used], trials=[t.trial_id for t in used],
                      checkpoints=[t.checkpoints.get(p, "") for t in used], seeds_expected=seeds_expected,
                      full_length=p >= max_images)
            finite = all(math.isfinite(v) for v in vals)
            row.mean = statistics.fmean(vals) if finite else math.inf
            row.std = statistics.stdev(vals) if finite and len(vals) > 1 else 0.0
            rows.append(row)
    rows.sort(key=Row.rank_key)
    return rows


def best_export_yaml(meta, row: Row, trials: list[Trial]) -> str:
    """The winning trial's own training config (its seed included) with the row's sampling spec and metric name:
    `p2sweep train` accepts it unchanged."""
    import yaml

    from p2core.config import apply_overrides, config_from_dict
    from p2core.metrics import metric_name

    first = next(t for t in trials if t.trial_id == row.trials[0])
    data = apply_overrides(meta.base, {k: v for k, v in first.config.items() if k != GROUP_KEY})
    kind, n, _ = parse_metric_name(meta.metric)
    data["eval"]["sampling_steps"] = [row.spec]
    data["metric"] = metric_name(kind.lstrip("r"), n, row.spec, data["eval"]["extractor"])
    cfg = config_from_dict(data)
    lost = f"; {row.lost} seed(s) lost" if row.lost else ""
    head = (f"# Best configuration of sweep {meta.name!r} by {row.metric} = {row.mean:.6g} (+- {row.std:.3g} over "
            f"{row.n} seed(s) {row.seeds} at {row.images_seen} images{lost}); trial(s): {', '.join(row.trials)}\n"
            f"# This is trial {first.trial_id} (seed {first.seed}) as it ran. Exported by `p2sweep best --export`;\n"
            f"# train it with `p2sweep train THIS_FILE` (set train.total_images).\n")
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def write_csv(path: str, trials: list[Trial], metric: str) -> None:
    """One line per (trial, point in training): every metric evaluated there."""
    import csv

    keys = sorted({k for t in trials for k in t.params})
    names = sorted({k for t in trials for ev in t.points.values() for k in ev})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "group", "seed", *keys, "state", "images_seen", *names])
        for t in trials:
            for p in sorted(t.points):
                w.writerow([t.trial_id, t.group, t.seed, *[t.params.get(k, "") for k in keys], t.state, p,
                            *[t.points[p].get(k, "") for k in names]])
