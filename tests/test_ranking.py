"""ASHA rebuilt on resume as it decided live, a retried seed in ASHA, one ranking for `best`, `compare`, the report
and the MLflow view, and ASHA's console lines. Each test names the case of issue 19 it covers."""
import functools
import json
import logging
import math
import os
import types
from types import SimpleNamespace

import pytest

from helpers import fake_trial
from sweeps.record.spec import SweepSpec

M = "rkid32_ddim5"


# -- case 6: the rebuild replays an errored seed where it failed, not after everything ----------------------------

T0 = 1000.0  # epoch seconds of the events below; the driver's local wall clock then is 2025-03-01 12:00:00 + t
# (time offset, trial, group, images_seen, value); "fail" = the trial raised out of retries then
EVENTS = [(1.0, "a0", 0, 100, 1.0), (1.5, "a1", 0, 100, 1.0),
          (2.0, "x", 1, 50, 0.4),        # x: its last report, below the rung
          (3.0, "b1", 1, 100, 0.5),      # configuration 1 waits for x
          (4.0, "c0", 2, 100, 0.8), (4.5, "c1", 2, 100, 0.9),
          (5.0, "x", 1, "fail", None),   # x raises: configuration 1 is +inf, stopped; 1e300 joins the rung
          (6.0, "d0", 3, 100, 0.95), (6.5, "d1", 3, 100, 0.95)]  # median of (1.0, 0.85, inf) = 1.0: continues
TRIALS = {"a0": 0, "a1": 0, "x": 1, "b1": 1, "c0": 2, "c1": 2, "d0": 3, "d1": 3}


def _live():
    """GroupASHA driven by Tune's hooks in the order the events happened."""
    from sweeps.tune.schedulers import GroupASHA

    s = GroupASHA(M, [100], 2, seeds_per_group=2)
    trials = {tid: types.SimpleNamespace(trial_id=tid, config={"p2sweep_group": g}, status="RUNNING",
                                         should_recover=lambda: False) for tid, g in TRIALS.items()}
    for t in trials.values():
        s.on_trial_add(None, t)
    for _, tid, g, imgs, v in EVENTS:
        if imgs == "fail":
            s.on_trial_error(None, trials[tid])
        else:
            s.on_trial_result(None, trials[tid], {M: v, "images_seen": imgs})
    return s


def _clock(t: float, zone_h: int) -> dict:
    """What Tune and the trainable stamp a report with: epoch seconds, and the worker's local time ("date")."""
    return {"reported_at": T0 + t + 0.25, "timestamp": int(T0 + t), "date": f"2025-03-01_{12 + zone_h}-00-{int(t):02d}"}


def _write_sweep(d, error_file: bool, worker_zone_h: int = 0, stats: bool = True):
    """The events as a sweep directory: result.json per trial (in directory order a0 < b1 < ... < x, not time
    order), Tune's experiment state with x in ERROR (named by the driver's local start time, 11:59:00 = epoch 940),
    and x's error.txt as the driver writes it (local time). `worker_zone_h`: the workers' clock is that many hours
    ahead of the driver's."""
    os.makedirs(d)
    data = []
    for tid, g in TRIALS.items():
        tdir = os.path.join(d, f"trial_{tid}")
        os.makedirs(tdir)
        cfg = {"p2sweep_group": g, "train.seed": int(tid[-1]) if tid[-1].isdigit() else 0}
        rows = [{"trial_id": tid, "config": cfg, "images_seen": imgs, M: v, **_clock(t, worker_zone_h)}
                for t, who, _, imgs, v in EVENTS if who == tid and imgs != "fail"]
        with open(os.path.join(tdir, "result.json"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        errored = tid == "x"
        if errored and error_file:
            with open(os.path.join(tdir, "error.txt"), "w") as f:
                f.write("Failure # 1 (occurred at 2025-03-01_12-00-05)\nRuntimeError: CUDA out of memory\n")
        tr = {"trial_id": tid, "status": "ERROR" if errored else "TERMINATED", "config": cfg,
              "relative_logdir": f"trial_{tid}"}
        rt = {"last_result": rows[-1], "num_failures": int(errored), "error_filename": "error.txt" if errored else None}
        data.append([json.dumps(tr), json.dumps(rt)])
    with open(os.path.join(d, "experiment_state-2025-03-01_11-59-00.json"), "w") as f:
        json.dump({"trial_data": data, **({"stats": {"start_time": T0 - 60 + 0.4}} if stats else {})}, f)


def _rebuilt(d):
    from sweeps.results.trials import rung_history
    from sweeps.tune.schedulers import GroupASHA

    r = GroupASHA(M, [100], 2, seeds_per_group=2, history=functools.partial(rung_history, d, M))
    r.on_trial_add(None, fake_trial("x", {"p2sweep_group": 1}, status="ERROR"))  # Tune restores it errored
    return r


def test_case6_rebuilt_asha_replays_an_errored_seed_when_it_failed(tmp_path):
    from sweeps.results.trials import rung_history

    live = _live()
    # what the live scheduler decided: configuration 1 stopped by x's failure, 3 continued
    assert live.stopped == {1: 100}
    assert list(live.rung_means[100].items()) == [(0, 1.0), (2, pytest.approx(0.85)), (1, math.inf),
                                                  (3, pytest.approx(0.95))]
    d = str(tmp_path / "with_error_file")
    _write_sweep(d, error_file=True, worker_zone_h=2)  # the workers' zone is not the driver's: the driver's counts
    hist = rung_history(d, M)
    # x's ERROR row at its failure (12:00:05 by the error file = epoch 1005): after c's reports, before d's
    assert [h[0] for h in hist] == ["a0", "a1", "x", "b1", "c0", "c1", "x", "d0", "d1"]
    assert hist[6] == ("x", 1, None, None, True)
    r = _rebuilt(d)
    assert r.stopped == live.stopped
    assert list(r.rung_means[100].items()) == list(live.rung_means[100].items())  # same decisions, same order


def test_case6_without_an_error_file_the_errored_seed_ends_at_its_last_report(tmp_path):
    from sweeps.results.trials import rung_history

    d = str(tmp_path / "no_error_file")
    _write_sweep(d, error_file=False)
    hist = rung_history(d, M)
    # the latest point known of x: right after its own last report (not after every other trial's reports)
    assert [h[0] for h in hist] == ["a0", "a1", "x", "x", "b1", "c0", "c1", "d0", "d1"]
    assert hist[3] == ("x", 1, None, None, True)
    r = _rebuilt(d)
    assert r.stopped == {1: 100}  # the live decisions: 3 continued
    assert r.rung_means[100] == {0: 1.0, 1: math.inf, 2: pytest.approx(0.85), 3: pytest.approx(0.95)}


def test_case6_failure_time_by_the_trials_own_clock_when_tune_recorded_no_start_time(tmp_path):
    from sweeps.results.trials import ended_at, read_results, rung_history

    d = str(tmp_path / "s")
    _write_sweep(d, error_file=True, stats=False)
    rows = read_results(os.path.join(d, "trial_x", "result.json"))
    assert ended_at(os.path.join(d, "trial_x"), rows) == 1005.0  # 12:00:05 on the clock its reports carry
    assert [h[0] for h in rung_history(d, M)] == ["a0", "a1", "x", "b1", "c0", "c1", "x", "d0", "d1"]
    assert ended_at(os.path.join(d, "trial_a0"), read_results(os.path.join(d, "trial_a0", "result.json"))) == 1001.25
    assert ended_at("", []) == math.inf  # nothing known: after everything


# -- case 7: `resume --retry-errored`: a retried seed is no longer +inf ---------------------------------------

HISTORY7 = [("p", 1, 100, 1.0, False), ("q", 1, 100, 1.0, False),      # configuration 1 first at 100
            ("x", 0, 100, 0.5, False), ("y", 0, 100, 0.5, False),      # configuration 0 continues at 100
            ("x", 0, None, None, True),                                # x raised (before 200)
            ("z", 2, 50, 0.5, False), ("z", 2, None, None, True),     # z raised before 100 ...
            ("w", 2, 100, 0.4, False)]                                 # ... so configuration 2 stopped at 100


def test_case7_a_retried_seed_that_reports_again_counts_with_its_values():
    from ray.tune.schedulers import TrialScheduler as TS

    from sweeps.tune.schedulers import GroupASHA

    s = GroupASHA(M, [100, 200], 2, seeds_per_group=2, history=lambda: HISTORY7)
    x, y, z = (fake_trial(t, {"p2sweep_group": g}) for t, g in (("x", 0), ("y", 0), ("z", 2)))
    assert s.on_trial_result(None, x, {M: 0.45, "images_seen": 150}) == TS.CONTINUE  # retried from a checkpoint
    assert s.on_trial_result(None, y, {M: 0.4, "images_seen": 200}) == TS.CONTINUE
    assert 0 not in s.rung_means[200]  # undecided: waits for x, which is training again
    assert s.on_trial_result(None, x, {M: 0.6, "images_seen": 200}) == TS.CONTINUE
    assert s.rung_means[200] == {0: pytest.approx(0.5)} and 0 not in s.stopped
    # decisions made while a seed counted as +inf stay: configuration 2 was stopped at 100 by z's error
    assert s.on_trial_result(None, z, {M: 0.1, "images_seen": 100}) == TS.STOP
    assert s.stopped == {2: 100} and s.rung_means[100] == {1: 1.0, 0: 0.5, 2: math.inf}


def test_case7_a_seed_tune_runs_again_is_waited_for_before_its_first_report():
    from ray.tune.schedulers import TrialScheduler as TS

    from sweeps.tune.schedulers import GroupASHA

    s = GroupASHA(M, [100, 200], 2, seeds_per_group=2, history=lambda: HISTORY7)
    # Tune re-adds the errored trial as PENDING (`resume --retry-errored`); its sibling reaches 200 first
    s.on_trial_add(None, fake_trial("x", {"p2sweep_group": 0}, status="PENDING"))
    assert s.on_trial_result(None, fake_trial("y", {"p2sweep_group": 0}), {M: 0.4, "images_seen": 200}) == TS.CONTINUE
    assert 0 not in s.rung_means[200] and 0 not in s.stopped
    # not retried (plain `resume`: Tune keeps it ERROR): still +inf
    k = GroupASHA(M, [100, 200], 2, seeds_per_group=2, history=lambda: HISTORY7)
    k.on_trial_add(None, fake_trial("x", {"p2sweep_group": 0}, status="ERROR"))
    assert k.on_trial_result(None, fake_trial("y", {"p2sweep_group": 0}), {M: 0.4, "images_seen": 200}) == TS.STOP
    assert k.stopped == {2: 100, 0: 200}


# -- case 8: --scope best: "complete" is about the training, the value is at the best point --------------------

def _trial(tid, group, seed, points, state="TERMINATED", diverged=False, images=None):
    from sweeps.results.trials import Trial

    return Trial(trial_id=tid, dir="", config={"train.lr": 0.001 * (group + 1), "p2sweep_group": group,
                                               "train.seed": seed},
                 group=group, seed=seed, state=state, images_seen=max(points, default=0) if images is None else images,
                 points={p: {M: v} for p, v in points.items()}, diverged=diverged,
                 history=[(p, v) for p, v in sorted(points.items())])


def test_case8_scope_best_ranks_a_configuration_whose_seeds_all_finished_by_its_best_point():
    from sweeps.results.trials import group_rows

    inf = math.inf
    trials = [
        # A: both seeds to the end (384); best mean 0.3 at 128
        _trial("a0", 0, 0, {128: 0.3, 384: 0.4}), _trial("a1", 0, 1, {128: 0.3, 384: 0.4}),
        # B: best at the end, 0.5: worse than A
        _trial("b0", 1, 0, {128: 0.6, 384: 0.5}), _trial("b1", 1, 1, {128: 0.6, 384: 0.5}),
        # C: a seed diverged after 128: not complete, even at its best point (128, both seeds finite)
        _trial("c0", 2, 0, {128: 0.35, 384: 0.45}),
        _trial("c1", 2, 1, {128: 0.35, 256: inf}, state="DIVERGED", diverged=True),
        # D: both seeds stopped by ASHA at 128: not complete, whatever its value
        _trial("d0", 3, 0, {128: 0.1}, state="STOPPED"), _trial("d1", 3, 1, {128: 0.1}, state="STOPPED"),
    ]
    rows = group_rows(trials, M, 384, 2, scope="best")
    assert [(r.group, r.images_seen, r.complete) for r in rows] == [
        (0, 128, True), (1, 384, True), (3, 128, False), (2, 128, False)]
    assert [r.mean for r in rows] == [pytest.approx(0.3), pytest.approx(0.5), pytest.approx(0.1),
                                      pytest.approx(0.35)]
    # scope last keeps its meaning: the row is at the end of training
    last = group_rows(trials, M, 384, 2)
    assert [(r.group, r.images_seen, r.complete) for r in last][:2] == [(0, 384, True), (1, 384, True)]


# -- case 9: one ranking for best, compare, the report and the MLflow view ---------------------------------------

def _ranking_sweep(tmp_path):
    three = lambda g, pts, **kw: [_trial(f"g{g}s{s}", g, s, pts, **kw) for s in range(3)]
    trials = (three(0, {128: 0.7, 384: 0.5})                                  # complete, 0.5
              + three(1, {128: 0.4, 256: 0.3}, state="RUNNING")               # every seed, not to the end yet
              + [_trial("g2s0", 2, 0, {128: 0.2, 384: 0.1})]                  # 1 of 3 seeds: best value, lost 2
              + [_trial(f"g2s{s}", 2, s, {}, state="ERROR") for s in (1, 2)]
              + three(3, {128: 0.8, 384: 0.6}))                               # complete, 0.6
    meta = SimpleNamespace(name="rank", metric=M, max_images=384, seeds=[0, 1, 2], dir=str(tmp_path),
                           base={"diffusion": {"p2_k": 1.0, "noise_schedule": "linear"}},
                           spec=SweepSpec("rank", {}, M, {"train.lr": ("grid", [0.001, 0.002, 0.003, 0.004])}))
    return meta, trials


def test_case9_best_compare_report_and_mlflow_order_rank_alike(tmp_path, monkeypatch, capsys):
    from sweeps.results import report_data
    from sweeps.results import trials as R
    from sweeps.commands import sweep as C

    meta, trials = _ranking_sweep(tmp_path)
    expected = [0, 3, 1, 2]  # complete by mean; then every seed but short; the 1-of-3-seeds row last
    # best: the rows of its table, in printed order
    monkeypatch.setattr(C, "_trials", lambda name, storage: (meta, trials))
    C.cmd_best(SimpleNamespace(name="rank", storage=None, scope="last", export=None))
    out = capsys.readouterr().out.splitlines()
    table = [ln for ln in out if ln.startswith("| ")][1:]  # under the header
    assert [int(ln.split("|")[1]) for ln in table] == expected
    assert "1/3 (lost seeds)" in table[-1]
    # compare
    header, rows = C.compare_table({"rank": (meta, trials)})
    assert [int(r[1]) for r in rows] == expected
    # the report's table of the sweep metric
    data = report_data.collect(meta, trials, provenance={}, baselines={}, importance=None)
    assert [r["group"] for r in data["tables"][M]] == expected
    assert [r["n"] for r in data["tables"][M]] == [3, 3, 3, 1] and data["tables"][M][0]["best"]
    # the MLflow view: its runs, sorted as the view sorts them (a real SQLite store), give the same order
    assert R.ranked_configs(trials, M, 384, 3) == expected
    from mlflow.tracking import MlflowClient

    from sweeps.record.replicate import Replicate
    from sweeps.tracking import runs as truns, view as tview

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("rank", artifact_location=str(tmp_path / "art"))
    meta.experiment, meta.parent_run_id = "rank", c.create_run(exp, tags={truns.ROLE: "sweep"}).info.run_id
    for t in trials:  # each run's own value of the sweep metric misleads: g2's lone seed has the lowest
        rid = c.create_run(exp, tags={"mlflow.parentRunId": meta.parent_run_id, truns.ROLE: "trial",
                                      truns.REPLICATE: Replicate.of(t.config).key}).info.run_id
        if t.history:
            c.log_metric(rid, M, t.history[-1][1])
    tview.set_sweep_view(c, exp, meta, trials)
    state = json.loads(json.loads(c.get_experiment(exp).tags["mlflow.sharedViewState.p2sweep"])["state"])
    key = state["orderByKey"]
    runs = c.search_runs([exp], filter_string=state["searchFilter"], order_by=[key + " ASC"])
    seen = []
    for r in runs:
        g = int(r.data.tags[truns.REPLICATE].split(":")[0])
        if g not in seen:
            seen.append(g)
    assert key == "metrics.`p2sweep_rank`" and seen == expected



def test_case9_with_two_sampling_specs_best_compare_and_mlflow_agree_on_the_winner(capsys, monkeypatch, tmp_path):
    """A is best at the sweep metric's own spec (ddim5), B at another (ddim50) and overall: `best` names B, so
    `compare` and the MLflow view's ranking put B first too (they once ranked by the sweep metric's spec alone)."""
    from sweeps.results import trials as R
    from sweeps.commands import sweep as C

    m10, m50 = M, "rkid32_ddim50"  # the sweep metric (rkid32_ddim5) and another spec of its family
    trials = []
    for g, (v10, v50) in enumerate(((0.1, 0.5), (0.2, 0.05))):
        for s in range(2):
            t = _trial(f"g{g}s{s}", g, s, {384: v10})
            t.points[384][m50] = v50
            trials.append(t)
    meta = SimpleNamespace(name="two", metric=m10, max_images=384, seeds=[0, 1], dir=str(tmp_path),
                           base={"diffusion": {}},
                           spec=SweepSpec("two", {}, m10, {"train.lr": ("grid", [0.001, 0.002])}))
    monkeypatch.setattr(C, "_trials", lambda name, storage: (meta, trials))
    C.cmd_best(SimpleNamespace(name="two", storage=None, scope="last", export=None))
    out = capsys.readouterr().out
    assert "with steps ddim50: 0.05" in out and "'train.lr': 0.002" in out.split("best: ")[1]
    assert R.ranked_configs(trials, m10, 384, 2) == [1, 0]
    _, rows = C.compare_table({"two": (meta, trials)})
    assert [int(r[1]) for r in rows] == [1, 0]

# -- ASHA's console line for each decision --------------------------------------------------------------------

def test_asha_prints_one_line_per_live_decision_and_none_for_replayed_ones(caplog):
    from sweeps.tune.schedulers import GroupASHA

    caplog.set_level(logging.INFO, logger="p2sweep.asha")
    s = GroupASHA("fid10k_250", [2528], 2, seeds_per_group=1)
    low = lambda v: {"rung_score": v, "rung_metric": "kid64_ddim10", "ckpt_score": math.inf, "images_seen": 2528}
    for g, v in ((0, 0.21), (1, 0.27), (2, 0.2)):
        s.on_trial_result(None, fake_trial(f"t{g}", {"p2sweep_group": g}), low(v))
    s.on_trial_error(None, types.SimpleNamespace(trial_id="e", config={"p2sweep_group": 3}, status="RUNNING",
                                                 should_recover=lambda: False))
    lines = [r.getMessage() for r in caplog.records if r.name == "p2sweep.asha"]
    assert lines == [
        "configuration 0 continues at 2,528 images: kid64_ddim10 0.21 (first at this rung)",
        "configuration 1 stopped at 2,528 images: kid64_ddim10 0.27 vs cutoff 0.21",
        "configuration 2 continues at 2,528 images: kid64_ddim10 0.2 (cutoff 0.24)",
        "configuration 3 stopped at 2,528 images: kid64_ddim10 inf (a seed diverged, raised or was not finite) "
        "vs cutoff 0.21"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "p2sweep.asha")
    # a resume rebuilds the same decisions without printing them again: one summary line, then live lines only
    caplog.clear()
    hist = [("t0", 0, 2528, 0.21, False), ("t1", 1, 2528, 0.27, False)]
    r = GroupASHA("fid10k_250", [2528], 2, seeds_per_group=1, history=lambda: hist)
    r.on_trial_result(None, fake_trial("t2", {"p2sweep_group": 2}), low(0.2))
    lines = [x.getMessage() for x in caplog.records if x.name == "p2sweep.asha"]
    assert lines == ["ASHA rebuilt from 2 earlier report(s): 2 rung decision(s), not printed again; "
                     "configuration(s) stopped: [1]",
                     "configuration 2 continues at 2,528 images: kid64_ddim10 0.2 (cutoff 0.24)"]
