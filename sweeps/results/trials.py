"""Reading a sweep back from its experiment directory (no Ray import): trials, status, ranking, export, CSV.

The trials of a sweep are the ones in Ray Tune's last saved experiment state (`experiment_state-*.json`), copied
to `p2sweep_trials.json` when a run or resume ends. A trial directory Tune does not know (the trial was started
after Tune's last save, then the driver died; Tune re-ran its configuration under a new id) is not a trial.
Each trial directory holds `result.json`, one JSON line per report (a `TrialReport`); a trial resumed from an older
checkpoint repeats some image counts, and the later report wins.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

from p2core.metrics import CHOSEN, ema_name, parse_metric_name, same_family, same_metric, split_ema

from .. import compat
from ..storage import fs as S
from ..storage import trial_files as TF
from ..record.meta import STATES
from ..record.replicate import Replicate, config_key
from ..record.trial_report import TrialReport
from ..storage.tune_state import newest_experiment_state

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
    """{trial_id: {state, diverged, images_seen, config, dir, failures, error_file, driver_clock}} from the experiment
    state Tune saved last (saved before Tune tears its trials down, so an interrupted trial is still RUNNING there).
    States: TERMINATED (trained to the end), STOPPED (ended early by ASHA), DIVERGED, ERROR, or RUNNING/PENDING/PAUSED
    (interrupted)."""
    out = {}
    for tid, t in saved_trials(d).items():
        m = t["last_result"]
        st = t["status"]
        if st == "TERMINATED":
            st = "DIVERGED" if m.get("diverged") else "TERMINATED" if m.get("final") else "STOPPED"
        out[tid] = {"state": st, "diverged": bool(m.get("diverged")),
                    "images_seen": int(m.get("images_seen", 0) or 0), "config": t["config"], "dir": t["dir"],
                    "failures": t["failures"], "error_file": t["error_file"], "driver_clock": t["driver_clock"]}
    return out


def saved_trials(d: str) -> dict:
    """{trial_id: {status (Tune's own), config, last_result, dir, failures, error_file, driver_clock}} of the
    experiment state Tune saved last, as Tune restores it."""
    newest = newest_experiment_state(d)  # by the start time each state records, not by its (local-time) name
    text = S.read_text(newest) if newest else None
    if text is None:
        return {}
    data = json.loads(text)
    clock = _driver_clock(newest, data)
    out = {}
    for tr, rt in compat.saved_trials(data):
        cfg = tr.get("config") or {}
        out[tr[compat.TRIAL_ID]] = {
            "status": tr.get("status", "PENDING"), "config": {k: v for k, v in cfg.items() if isinstance(k, str)},
            "last_result": rt.get("last_result") or {}, "dir": tr.get("relative_logdir") or "",
            "failures": int(rt.get("num_failures", 0)), "error_file": rt.get("error_filename") or "",
            "driver_clock": clock}
    return out


def _driver_clock(path: str, data: dict) -> float | None:
    """Seconds the driver's local wall clock was ahead of epoch time: Tune names the state file by the session's
    local start time and records the same instant in epoch seconds (`stats.start_time`). None when unknown."""
    try:
        local = dt.datetime.strptime(compat.state_session(S.basename(path)), _TUNE_DATE)
        return _naive_epoch(local) - math.floor(float(data["stats"]["start_time"]))
    except (KeyError, TypeError, ValueError):
        return None


def _naive_epoch(t: dt.datetime) -> float:
    """A local wall-clock time as if it were UTC (what it is once its zone's offset is taken off)."""
    return (t - dt.datetime(1970, 1, 1)).total_seconds()


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
    judged: dict = field(default_factory=dict)  # images_seen -> (rung metric, what ASHA compares: TrialReport.judged)

    @property
    def params(self) -> dict:
        """The configuration's values without the bookkeeping (group) and the seed."""
        return Replicate.of(self.config).params

    @property
    def config_key(self):
        """Its configuration's key (`record.replicate.config_key`): its group, or its values when it has none."""
        return config_key(self.group, self.params)

    @property
    def latest(self):
        return self.history[-1][1] if self.history else None

    @property
    def best(self):
        vals = [v for _, v in self.history if math.isfinite(v)]
        return min(vals) if vals else None


def load_trials(d: str, metric: str, milestones: list | None = None) -> list[Trial]:
    """The sweep's trials. With `milestones` (ASHA's rungs below the end: the spec's), a trial's `last_rung` under
    scheduler.ema_rule best is what ASHA compared at the last rung it reached."""
    states = known_states(d)
    dirs = {}
    for rj in S.children_with(d, "result.json"):
        rows = read_results(rj)
        if rows:
            dirs[rows[0].get(compat.TRIAL_ID)] = (S.dirname(rj), rows)
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
        who = Replicate.of(config)
        trials.append(Trial(
            trial_id=tid, dir=tdir, config=config, group=who.group, seed=who.seed, state=state,
            images_seen=max(last.images_seen if last else 0, int(st.get("images_seen", 0))),
            points={r.images_seen: dict(r.evals) for r in reps},
            history=[(r.images_seen, r.value) for r in reps if r.evaluated], checkpoints=ckpts,
            diverged=bool(last and last.diverged), node_ip=last.node_ip if last else "",
            node=" > ".join(_runs_of([r.node for r in reps if r.node])),
            last_rung=_last_rung(last, metric),
            judged={r.images_seen: (r.rung_metric, r.judged) for r in reps}))
    if milestones:
        _judge_on_the_chosen_ema(trials, milestones)
    return trials


def _judge_on_the_chosen_ema(trials: list, milestones: list) -> None:
    """Under scheduler.ema_rule best, a trial's last rung is what ASHA compared at the last milestone it reached
    (`record.trial_report.judged_rungs`, as GroupASHA records it): its value at the EMA its configuration's seeds chose
    together there, the metric named with that EMA (`rkid1k_ddim10_ema0.05`), not its tracked EMA's rung value."""
    from ..record.trial_report import judged_rungs

    groups: dict = {}
    for t in trials:
        groups.setdefault(t.group, []).append(t)
    for seeds in groups.values():
        cells = judged_rungs({x.trial_id: x.judged for x in seeds},
                             {x.trial_id for x in seeds if x.state in ("DIVERGED", "ERROR")}, milestones)
        for x in seeds:
            x.last_rung = cells.get(x.trial_id, x.last_rung)


def _runs_of(xs: list) -> list:
    """[a, a, b, a] -> [a, b, a]: where a trial ran, in order."""
    return [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x]


def _last_rung(last, metric: str) -> tuple:
    if last is None:
        return ()
    rm, rv = last.rung_metric, last.rung_value
    if rm != metric and same_metric(rm, metric):
        rm, rv = metric, last.value  # a sweep that spelled its metric another way (kid1000 for kid1k)
    return last.images_seen, rm, rv


def _state_from_files(last, tdir) -> str:
    if last is None:
        return "PENDING"
    if last.diverged:
        return "DIVERGED"
    if last.final:
        return "TERMINATED"
    if tdir and S.exists(S.join(tdir, compat.ERROR_FILE)):
        return "ERROR"
    return "STOPPED"


def rung_history(d: str, metric: str) -> list[tuple]:
    """[(trial_id, group, images_seen, rung score, ended)] of every report of the known trials and a row
    (trial_id, group, None, None, True) for each trial that ended in ERROR, all in the order they happened (ASHA's
    rung records are rebuilt from them on resume, and must come out as the live scheduler made them: it marked an
    errored seed ended when the failure came in, between the other trials' reports)."""
    known = known_states(d)
    out, dirs = [], {}
    for rj in S.children_with(d, "result.json"):
        rows = read_results(rj)
        for r in rows:
            if known and r.get(compat.TRIAL_ID) not in known:
                continue
            rep = TrialReport.from_result(metric, r)
            g = Replicate.of(r.get("config")).group
            out.append((_when(r), 0, r[compat.TRIAL_ID], g, rep.images_seen, rep.judged, rep.diverged))
        if rows:
            dirs[rows[0].get(compat.TRIAL_ID)] = (S.dirname(rj), rows)
    for tid, st in known.items():
        if st.get("state") == "ERROR":
            tdir, rows = dirs.get(tid, (S.join(d, st["dir"]) if st.get("dir") else "", []))
            # kind 1: after a report made at the same instant (its own last report, when the failure time is unknown)
            at = ended_at(tdir, rows, st.get("error_file") or compat.ERROR_FILE, st.get("driver_clock"))
            out.append((at, 1, tid, Replicate.of(st.get("config")).group, None, None, True))
    return [x[2:] for x in sorted(out, key=lambda x: x[:2])]


def _when(r: dict) -> float:
    return float(r.get("reported_at", r.get(compat.TIMESTAMP, 0)) or 0)


_TUNE_DATE = compat.TUNE_DATE  # Tune's local wall-clock times, whole seconds


def ended_at(tdir: str, rows: list, error_file: str = compat.ERROR_FILE, driver_clock: float | None = None) -> float:
    """When an ERROR trial ended, in epoch seconds: the last failure Tune wrote to its error file (the one that used
    up its retries), never before its last report; its last report's time when the error file is unreadable; +inf
    (after everything) when neither is known. `rows`: its reports; `driver_clock`: see `_driver_clock`."""
    last = max((_when(r) for r in rows), default=None)
    text = S.read_text(S.join(tdir, error_file)) if tdir else None
    found = compat.failure_times(text)
    try:
        failed = _naive_epoch(dt.datetime.strptime(found[-1], _TUNE_DATE))
    except (IndexError, ValueError):
        return math.inf if last is None else last
    # the error file has the driver's local time: the driver's own offset (from Tune's state file) first, else the
    # offset of the clock the trial's reports carry ("date" beside epoch "timestamp"), else this machine's zone
    ref = next((r for r in reversed(rows) if r.get(compat.DATE) and r.get(compat.TIMESTAMP) is not None), None)
    try:
        if driver_clock is not None:
            at = failed - float(driver_clock)
        elif ref is not None:
            at = failed - (_naive_epoch(dt.datetime.strptime(str(ref[compat.DATE]), _TUNE_DATE)) -
                           int(ref[compat.TIMESTAMP]))
        else:
            at = time.mktime(time.strptime(found[-1], _TUNE_DATE))
    except (TypeError, ValueError):
        at = time.mktime(time.strptime(found[-1], _TUNE_DATE))
    return at if last is None else max(at, last)  # whole seconds: never before the report it followed


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
    """One (configuration, sampling spec, EMA) of a sweep, over the seeds that reached the same point in training."""
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
    full_length: bool         # every seed trained to the end: the row's point is max_images (scope last), or each
    #                           seed of the configuration reached max_images without diverging (scope best)
    mean: float = math.inf
    std: float = 0.0
    ema: float | str | None = None  # the sigma_rel of a reconstructed EMA (eval.ema_sigma_rels); None: the tracked
    #                                 EMA; CHOSEN: the one eval.ema_choose_on ranked first (per seed, `chosen`)
    chosen: list = field(default_factory=list)  # CHOSEN rows: the sigma_rel each counted seed's cheap metric chose
    #                                               (None: the tracked EMA)

    @property
    def ema_label(self) -> str:
        if self.ema == CHOSEN:
            return f"{CHOSEN} ({', '.join(ema_name(s) for s in self.chosen)})"
        return ema_name(self.ema)

    @property
    def sigma_rel(self) -> float | None:
        """The sigma_rel `best --export` reconstructs: the row's own, or the one its first seed chose there; None:
        the tracked EMA (the checkpoint's weights)."""
        return self.chosen[0] if self.ema == CHOSEN else self.ema

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

    @property
    def config_key(self):
        """Its configuration's key (`record.replicate.config_key`)."""
        return config_key(self.group, self.config)

    def rank_key(self):
        # complete rows first; then rows with every seed (trained less far); rows that lost seeds last; the group
        # and metric only settle exact ties, so that every caller gets one order
        return (not self.complete, self.lost > 0, math.isinf(self.mean), self.mean, self.group, self.metric)


def rank(rows: list[Row]) -> list[Row]:
    """The one ranking of a sweep's rows, best first: `best`, `compare`, the report and the MLflow view use it."""
    return sorted(rows, key=Row.rank_key)


def config_order(rows: list[Row]) -> list:
    """The configurations (`config_key`) of `rows`, best first: each by its best-ranked row over every sampling spec
    (`rank`), so the first is the configuration of the row `best` names and the order is that of `best`'s table."""
    first: dict = {}
    for r in rank(rows):
        first.setdefault(r.config_key, None)
    return list(first)


def ranked_configs(trials: list[Trial], metric: str, max_images: int, seeds_expected: int,
                   scope: str = "last") -> list:
    """The configuration keys (`config_key`) of a sweep, best first, in the order `best` and `compare` show."""
    return config_order(group_rows(trials, metric, max_images, seeds_expected, scope))


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
    """One row per (configuration, sampling spec, EMA) in the sweep metric's family (same kind and n), ranked: an
    EMA reconstructed post hoc (`eval.ema_sigma_rels`, metric names `..._ema0.07`) is a row like a sampling spec.
    `scope=last`: each spec at the latest point its seeds share; `scope=best`: every spec of a configuration at the
    one point where the sweep metric's mean was best."""
    groups: dict = {}
    for t in trials:
        groups.setdefault(t.config_key, []).append(t)
    rows = []
    for g, ts in groups.items():
        names = sorted({k for t in ts for ev in t.points.values() for k in ev if same_family(k, metric)})
        fixed = _best_point(ts, metric) if scope == "best" else None
        # scope best: the value is at the best point, but "complete" is about the training: every seed to the end
        trained = all(t.images_seen >= max_images and not t.diverged for t in ts)
        for name in names:
            if fixed is not None:
                p, used = fixed, [t for t in ts if name in t.points.get(fixed, {})]
                if not used:
                    continue
            else:
                p, used = _common_point(ts, name)
            used = sorted(used, key=lambda t: t.seed)
            vals = [t.points[p][name] for t in used]
            plain, ema = split_ema(name)
            row = Row(group=ts[0].group, config=ts[0].params, spec=parse_metric_name(plain)[2], metric=name, ema=ema,
                      images_seen=p, values=vals, seeds=[t.seed for t in used], trials=[t.trial_id for t in used],
                      checkpoints=[t.checkpoints.get(p, "") for t in used], seeds_expected=seeds_expected,
                      chosen=[None if t.points[p].get("ema_chosen_tracked") else t.points[p].get("ema_chosen")
                              for t in used] if ema == CHOSEN else [],
                      full_length=trained if fixed is not None else p >= max_images)
            finite = all(math.isfinite(v) for v in vals)
            row.mean = statistics.fmean(vals) if finite else math.inf
            row.std = statistics.stdev(vals) if finite and len(vals) > 1 else 0.0
            rows.append(row)
    return rank(rows)


def best_export_yaml(meta, row: Row, trials: list[Trial]) -> str:
    """The winning trial's own training config (its seed included) with the row's sampling spec and metric name:
    `p2sweep train` accepts it unchanged."""
    import yaml

    from p2core.config import config_from_dict
    from p2core.metrics import metric_name

    from ..record.replicate import trial_config

    first = next(t for t in trials if t.trial_id == row.trials[0])
    cfg = trial_config(meta.base, first.config)
    cheap = cfg.eval.ema_choose_on
    kind, n, _ = parse_metric_name(meta.metric)
    cfg.eval.sampling_steps = [row.spec]
    if row.ema is not None:  # the winner's EMA is scored beside the tracked one when this config trains
        cfg.eval.ema_sigma_rels = [row.sigma_rel] if row.sigma_rel is not None else []
        cfg.eval.ema_choose_on = ""
    cfg.metric = metric_name(kind.lstrip("r"), n, row.spec, cfg.eval.extractor)
    cfg = config_from_dict(cfg.to_dict())  # validated again: the metric must be one this config produces
    lost = f"; {row.lost} seed(s) lost" if row.lost else ""
    chose = (f" (chosen there by {cheap or 'the cheap metric'} for seed "
             f"{first.seed}; the seeds chose {', '.join(ema_name(s) for s in row.chosen)})" if row.ema == CHOSEN else "")
    head = (f"# Best configuration of sweep {meta.name!r} by {row.metric} = {row.mean:.6g} (+- {row.std:.3g} over "
            f"{row.n} seed(s) {row.seeds} at {row.images_seen} images{lost}); trial(s): {', '.join(row.trials)}\n"
            + (f"# The row's EMA: sigma_rel {row.sigma_rel:g}{chose}, reconstructed post hoc from the power-EMA "
               f"snapshots (metric {row.metric}; the winner over the sweep's sampling specs and EMAs, so "
               f"optimistic).\n" if row.sigma_rel is not None else
               f"# The row's EMA: the tracked one{chose} (metric {row.metric}).\n" if row.ema is not None else "") +
            f"# This is trial {first.trial_id} (seed {first.seed}) as it ran. Exported by `p2sweep best --export`;\n"
            f"# train it with `p2sweep train THIS_FILE` (set train.total_images).\n")
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def ema_weights_path(export_path: str, row: Row) -> str:
    """Where `best --export FILE` writes the weights of an EMA row: beside FILE, named by sigma_rel and images."""
    from p2core.metrics import ema_label

    return f"{os.path.splitext(export_path)[0]}_{ema_label(row.sigma_rel)}_{row.images_seen:012d}.pt"


def export_ema_weights(row: Row, trials: list[Trial], path: str) -> str:
    """Reconstruct the EMA of `row` (sigma_rel `row.ema`, at `row.images_seen`) from its first seed's power-EMA
    snapshots in the storage (`<trial>/p2/ema_snapshots`, only those taken up to that point) and write it as a bare
    float32 state_dict with the official P2/ADM key names (`torch.load` + `load_state_dict` in the official
    `image_sample.py`, strict). The trainer takes a snapshot at every evaluation point with post-hoc EMAs, so these
    are the files the row's score came from."""
    import tempfile

    import torch

    from p2core import phema
    from p2core.checkpoint import atomic_torch_save
    from p2core.errors import UserError

    first = next(t for t in trials if t.trial_id == row.trials[0])
    folder = TF.snapshots_dir(first.dir)
    names = [n for n in (S.listdir(folder) if S.isdir(folder) else []) if phema.SNAPSHOT_NAME.match(n)
             and int(phema.SNAPSHOT_NAME.match(n).group(1)) <= row.images_seen]
    if not names:
        raise UserError(f"{folder}: no power-EMA snapshot up to {row.images_seen} images to reconstruct "
                        f"sigma_rel {row.sigma_rel:g} from")
    with tempfile.TemporaryDirectory() as tmp:
        local = folder
        if S.is_uri(folder):  # only the snapshots this point uses come over
            local = os.path.join(tmp, "ema_snapshots")
            for n in names:
                S.download(S.join(folder, n), os.path.join(local, n))
        sd = phema.reconstruct(phema.load_snapshots(local, upto_images=row.images_seen, mmap=True), row.sigma_rel,
                               row.images_seen)
        atomic_torch_save({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}, path)
    return path


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
