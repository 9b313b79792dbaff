"""The sweep's decision logic without a Ray session: replicate searcher, group ASHA, ranking, reports, tracking
retries, names, Ray start-up arguments. Each test names the case of the "sweeps, part 2" issue it covers."""
import json
import math
import os
import types

import pytest
import yaml

from helpers import ROOT, fake_trial, smoke_raw, write_trial




# -- case 1: replicates run the same configuration; random search is reproducible ------------------------------

def test_random_search_gives_every_seed_the_same_configuration_and_is_reproducible():
    from sweeps.tune.schedulers import GroupSearcher

    space = {"diffusion.p2_gamma": ("uniform", [0.0, 2.0]), "diffusion.p2_k": ("loguniform", [0.1, 10.0]),
             "diffusion.noise_schedule": ("grid", ["linear", "cosine"])}

    def draw(seed):
        s = GroupSearcher(space, "random", 2, [0, 1, 2], "rkid32_ddim5", search_seed=seed)
        out = []
        while True:
            c = s.suggest(f"t{len(out)}")
            if c == "FINISHED":
                return out
            out.append(c)

    a = draw(7)
    assert len(a) == 2 * 2 * 3  # (grid 2 x num_samples 2) configurations x 3 seeds
    for g in range(4):
        members = [c for c in a if c["p2sweep_group"] == g]
        assert sorted(c["train.seed"] for c in members) == [0, 1, 2]
        vals = {json.dumps({k: v for k, v in c.items() if k != "train.seed"}, sort_keys=True) for c in members}
        assert len(vals) == 1  # the replicates are the same configuration
    assert draw(7) == a
    assert [c["diffusion.p2_gamma"] for c in draw(8)] != [c["diffusion.p2_gamma"] for c in a]
    assert len({c["diffusion.p2_gamma"] for c in a}) == 4


def _optuna_searcher(tmp_path, seeds, n=2):
    from sweeps.tune.schedulers import GroupSearcher

    space = {"diffusion.p2_gamma": ("uniform", [0.0, 2.0]), "train.lr": ("choice", [1e-3, 3e-3])}
    return GroupSearcher(space, "optuna", n, seeds, "m", optuna_url=f"sqlite:///{tmp_path}/o.db",
                         study_name="s-1", sweep_id="id1")


def test_optuna_is_asked_and_told_once_per_configuration(tmp_path):
    import optuna

    s = _optuna_searcher(tmp_path, [0, 1])
    cfgs = {f"t{i}": s.suggest(f"t{i}") for i in range(4)}
    assert s.suggest("t4") == "FINISHED"
    study = s.study
    assert len(study.get_trials()) == 2  # one Optuna trial per configuration, not per seed
    assert cfgs["t0"]["diffusion.p2_gamma"] == cfgs["t1"]["diffusion.p2_gamma"]
    # group 0: both seeds reach the end -> COMPLETE with the mean
    for tid, v in (("t0", 0.2), ("t1", 0.4)):
        s.on_trial_result(tid, {"m": v + 0.5, "images_seen": 128})
        s.on_trial_complete(tid, {"m": v, "images_seen": 384, "final": 1})
    # group 1: seed 0 is stopped early -> PRUNED, keeping the rung mean as intermediate value
    s.on_trial_result("t2", {"m": 0.9, "images_seen": 128})
    s.on_trial_result("t3", {"m": 0.7, "images_seen": 128})
    s.on_trial_complete("t2", {"m": 0.9, "images_seen": 128, "final": 0})
    assert study.get_trials()[1].state == optuna.trial.TrialState.RUNNING  # told only once every seed is in
    s.on_trial_complete("t3", {"m": 0.5, "images_seen": 384, "final": 1})
    t0, t1 = study.get_trials()
    assert t0.state == optuna.trial.TrialState.COMPLETE and t0.value == pytest.approx(0.3)
    assert t0.intermediate_values == {128: pytest.approx(0.8), 384: pytest.approx(0.3)}
    assert t1.state == optuna.trial.TrialState.PRUNED and t1.intermediate_values == {128: pytest.approx(0.8)}
    # a seed that raised fails its configuration
    s2 = _optuna_searcher(tmp_path / "b", [0], n=1)
    os.makedirs(tmp_path / "b")
    s2.suggest("x")
    s2.on_trial_complete("x", None, error=True)
    assert s2.study.get_trials()[0].state == optuna.trial.TrialState.FAIL


# -- case 7: a crash between Optuna's tell and Tune's save ----------------------------------------------------

def test_optuna_restore_adopts_lost_trials_and_tells_idempotently(tmp_path):
    import optuna

    s = _optuna_searcher(tmp_path, [0], n=3)
    s.suggest("a")
    saved = str(tmp_path / "searcher.pkl")
    s.save(saved)  # Tune's last save: one configuration handed out
    s.suggest("b")  # asked after the save, then the driver dies
    s.on_trial_complete("a", {"m": 0.5, "images_seen": 384, "final": 1})  # told after the save
    lost = s.groups[1]["optuna"]
    r = _optuna_searcher(tmp_path, [0], n=3)
    r.restore(saved)  # (no Optuna I/O inside Tune's restore: adoption happens at the next new configuration)
    # Tune re-creates the lost trial under a new id: it gets the lost Optuna trial and its values back
    assert r.suggest("b2")["diffusion.p2_gamma"] == s.groups[1]["params"]["diffusion.p2_gamma"]
    assert r.groups[1]["optuna"] == lost
    # trial "a" (restored by Tune) finishes again: no UpdateFinishedTrialError, the first value stays
    r.on_trial_result("a", {"m": 0.6, "images_seen": 384})
    r.on_trial_complete("a", {"m": 0.6, "images_seen": 384, "final": 1})
    r.on_trial_complete("b2", {"m": 0.7, "images_seen": 384, "final": 1})
    r.suggest("c")
    r.on_trial_complete("c", {"m": 0.8, "images_seen": 384, "final": 1})
    assert r.suggest("d") == "FINISHED"
    states = [t.state for t in r.study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 3
    assert r.study.get_trials()[0].value == pytest.approx(0.5)


def _saved(config, status="RUNNING", last_result=None):
    """One trial as `results.trials.saved_trials` reads it from Tune's experiment state (through JSON, as there)."""
    return json.loads(json.dumps({"config": config, "status": status, "last_result": last_result or {}}))


def test_a_resume_makes_the_searcher_agree_with_the_trials_tune_saved(tmp_path):
    """Tune saves its trials (experiment state) and the searcher in separate files, copied to the storage one by
    one: a driver killed in between leaves a searcher that handed out a trial Tune lost (the replicate would never
    run: seen as a resumed 2-point grid that ended with 1 trial), or one that lacks a trial Tune has (its result
    would not count and its replicate would run twice). The resumed searcher follows Tune's trials."""
    from sweeps.record.replicate import Replicate
    from sweeps.tune.schedulers import GroupSearcher, RootedSearchGenerator

    space = {"diffusion.p2_gamma": ("grid", [0.0, 1.0, 2.0])}

    def gen(restored=None, max_concurrent=0):
        g = RootedSearchGenerator(GroupSearcher(space, "grid", 1, [0, 1], "m", max_concurrent=max_concurrent),
                                  str(tmp_path), None, restored=restored)
        g._total_samples = 6  # 3 configurations x 2 seeds (Tune's num_samples)
        return g

    g = gen()
    cfg = {}
    for tid in "abc":  # group 0 seeds 0 and 1, group 1 seed 0
        cfg[tid] = g.searcher.suggest(tid)
        g._counter += 1
    g.save_to_dir(str(tmp_path), "2026-12-06_10-00-00")
    rep = {t: Replicate.of(c) for t, c in cfg.items()}
    assert [(r.group, r.seed) for r in rep.values()] == [(0, 0), (0, 1), (1, 0)]

    # Tune saved a and b only: c's replicate is handed out again, with its values, under Tune's new id
    r = gen({"a": _saved(cfg["a"]), "b": _saved(cfg["b"])})
    r.restore_from_dir(str(tmp_path))
    assert r._counter == 2 and not r.is_finished()
    assert r.searcher.suggest("c2") == cfg["c"]
    handed = [Replicate.of(r.searcher.suggest(t)) for t in ("d", "e", "f")]
    assert [(x.group, x.seed) for x in handed] == [(1, 1), (2, 0), (2, 1)]
    assert r.searcher.suggest("g") == "FINISHED"

    # Tune has trials the searcher never heard of: (1, 1) of a known group and (2, 0) of a group it never made;
    # they count as handed out (not handed out again) and their results count
    d = Replicate(group=1, seed=1, params=rep["c"].params).config()
    e = Replicate(group=2, seed=0, params={"diffusion.p2_gamma": 2.0}).config()
    r = gen({**{t: _saved(c) for t, c in cfg.items()}, "d": _saved(d), "e": _saved(e)})
    r.restore_from_dir(str(tmp_path))
    assert r._counter == 5 and r.searcher.next_group == 3
    last = Replicate.of(r.searcher.suggest("f"))
    assert (last.group, last.seed, last.params) == (2, 1, {"diffusion.p2_gamma": 2.0})
    assert r.searcher.suggest("g") == "FINISHED"
    r.searcher.on_trial_complete("e", {"m": 0.5, "images_seen": 384, "final": 1})
    assert r.searcher.groups[2]["outcomes"] == {0: ("complete", 0.5)}

    # ... and trials that ended before the kill, which Tune will not run again (it tells the searcher nothing of
    # them on restore): their outcomes come from their last results; with two at a time, the searcher still says
    # FINISHED once everything is handed out (it waited for ever for a slot that the ended trials held)
    done = {"a": _saved(cfg["a"], "TERMINATED", {"m": 0.4, "images_seen": 384, "final": 1}),
            "b": _saved(cfg["b"], "TERMINATED", {"m": 0.6, "images_seen": 128, "final": 0}),
            "c": _saved(cfg["c"], "ERROR"), "d": _saved(d, "RUNNING"),
            "e": _saved(e, "TERMINATED", {"m": 0.3, "images_seen": 384, "final": 1}),
            "f": _saved(Replicate(group=2, seed=1, params={"diffusion.p2_gamma": 2.0}).config(), "TERMINATED",
                        {"m": 0.5, "images_seen": 384, "final": 1})}
    r = gen(done, max_concurrent=2)
    r.restore_from_dir(str(tmp_path))
    outcomes = {g: grp["outcomes"] for g, grp in r.searcher.groups.items()}
    assert outcomes == {0: {0: ("complete", 0.4), 1: ("stopped", 0.6)}, 1: {0: ("error", None)},
                        2: {0: ("complete", 0.3), 1: ("complete", 0.5)}}
    assert r.searcher.live() == 1 and r.searcher.verdict(2) == ("complete", pytest.approx(0.4))
    assert r.searcher.suggest("g") == "FINISHED"
    # with --retry-errored Tune runs c again: its seed has no outcome until it ends
    r = RootedSearchGenerator(GroupSearcher(space, "grid", 1, [0, 1], "m"), str(tmp_path), None, restored=done,
                              retry_errored=True)
    r.restore_from_dir(str(tmp_path))
    assert r.searcher.groups[1]["outcomes"] == {}


def test_a_resumed_optuna_group_known_only_from_its_trial_is_told_on_its_own_optuna_trial(tmp_path):
    import optuna

    from sweeps.tune.schedulers import RootedSearchGenerator

    s = _optuna_searcher(tmp_path, [0], n=3)
    cfg = {"a": s.suggest("a")}
    saved = str(tmp_path / "state")
    os.makedirs(saved)
    gen = RootedSearchGenerator(s, str(tmp_path), None)
    gen._total_samples, gen._counter = 3, 1
    gen.save_to_dir(saved, "2026-12-06_10-00-00")  # the searcher's last save: one configuration
    cfg["b"] = s.suggest("b")  # asked in Optuna and saved by Tune, then the driver dies before the searcher's save
    restored = {"a": _saved(cfg["a"]), "b": _saved(cfg["b"])}
    r = RootedSearchGenerator(_optuna_searcher(tmp_path, [0], n=3), str(tmp_path), None, restored=restored)
    r.restore_from_dir(saved)
    assert r.searcher.groups[1]["params"] == s.groups[1]["params"] and r._counter == 2
    third = r.searcher.suggest("c")  # a new configuration: not b's Optuna trial, which b's group takes
    assert r.searcher.groups[1]["optuna"] == s.groups[1]["optuna"] and r.searcher.groups[2]["optuna"] == 2
    assert third["diffusion.p2_gamma"] != cfg["b"]["diffusion.p2_gamma"]
    assert r.searcher.suggest("d") == "FINISHED"
    for tid, v in (("b", 0.7), ("a", 0.5), ("c", 0.6)):
        r.searcher.on_trial_complete(tid, {"m": v, "images_seen": 384, "final": 1})
    trials = r.searcher.study.get_trials()
    assert len(trials) == 3 and [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.value for t in trials] == [pytest.approx(0.5), pytest.approx(0.7), pytest.approx(0.6)]


def test_a_resumed_optuna_configuration_that_ended_before_the_kill_is_told_at_once(tmp_path):
    """Both seeds of a configuration ended before the kill, but the searcher's saved state predates them (Tune's is
    newer): no trial event will ever come for them, so the first `suggest` after the restore tells Optuna; a group
    whose Optuna trial cannot be found gets one asked with its values."""
    import optuna

    from sweeps.record.replicate import Replicate
    from sweeps.tune.schedulers import RootedSearchGenerator

    s = _optuna_searcher(tmp_path, [0, 1], n=2)
    cfg = {t: s.suggest(t) for t in ("a", "b")}
    saved = str(tmp_path / "state")
    os.makedirs(saved)
    gen = RootedSearchGenerator(s, str(tmp_path), None)
    gen._total_samples, gen._counter = 4, 2
    gen.save_to_dir(saved, "2026-12-06_10-00-00")
    lost = Replicate(group=1, seed=0, params={"diffusion.p2_gamma": 1.5, "train.lr": 0.003}).config()
    restored = {"a": _saved(cfg["a"], "TERMINATED", {"m": 0.2, "images_seen": 384, "final": 1}),
                "b": _saved(cfg["b"], "TERMINATED", {"m": 0.4, "images_seen": 384, "final": 1}),
                "x": _saved(lost, "TERMINATED", {"m": 0.9, "images_seen": 384, "final": 1})}
    r = RootedSearchGenerator(_optuna_searcher(tmp_path, [0, 1], n=2), str(tmp_path), None, restored=restored)
    r.restore_from_dir(saved)
    assert r.searcher.study.get_trials()[0].state == optuna.trial.TrialState.RUNNING  # no Optuna I/O in restore
    assert Replicate.of(r.searcher.suggest("y")).key == "1:1"
    t = r.searcher.study.get_trials()
    assert t[0].state == optuna.trial.TrialState.COMPLETE and t[0].value == pytest.approx(0.3)
    assert len(t) == 2 and t[1].params == {"diffusion.p2_gamma": 1.5, "train.lr": 0.003}  # asked with its values
    r.searcher.on_trial_complete("y", {"m": 0.7, "images_seen": 384, "final": 1})
    t = r.searcher.study.get_trials()
    assert t[1].state == optuna.trial.TrialState.COMPLETE and t[1].value == pytest.approx(0.8)


# -- case 1/3: ASHA per configuration on the mean over seeds; non-finite is the worst ---------------------------

def test_group_asha_decides_on_the_mean_over_seeds():
    from ray.tune.schedulers import TrialScheduler as TS

    from sweeps.tune.schedulers import GroupASHA

    s = GroupASHA("m", [100, 300], 3, seeds_per_group=2)
    t = {(g, k): fake_trial(f"{g}{k}", {"p2sweep_group": g}) for g in range(3) for k in range(2)}
    res = lambda v, i=100: {"m": v, "images_seen": i}
    for x in t.values():
        s.on_trial_add(None, x)
    assert s.on_trial_result(None, t[0, 0], res(1.0)) == TS.CONTINUE
    assert s.on_trial_result(None, t[0, 1], res(1.2)) == TS.CONTINUE  # group 0: first at the rung, continues
    # group 1: seed 0 alone would be cut (0.5 < 1.1 is better, but 3.0 is worse); the mean 1.75 > cutoff 1.1
    assert s.on_trial_result(None, t[1, 0], res(0.5)) == TS.CONTINUE  # waits for its sibling
    assert s.on_trial_result(None, t[1, 1], res(3.0)) == TS.STOP
    assert s.stopped == {1: 100} and s.rung_means[100] == {0: pytest.approx(1.1), 1: pytest.approx(1.75)}
    assert s.on_trial_result(None, t[1, 0], res(0.4, 150)) == TS.STOP  # the sibling stops at its next report
    # group 2: a NaN metric is +inf, the worst: stopped (a NaN compares false and would never be stopped)
    s.on_trial_result(None, t[2, 0], res(0.1))
    assert s.on_trial_result(None, t[2, 1], res(float("nan"))) == TS.STOP
    assert math.isinf(s.rung_means[100][2])


def test_group_asha_counts_a_diverged_seed_as_worst_and_rebuilds_from_history():
    from sweeps.tune.schedulers import GroupASHA

    s = GroupASHA("m", [100], 3, seeds_per_group=2)
    a, b = fake_trial("a", {"p2sweep_group": 0}), fake_trial("b", {"p2sweep_group": 0})
    s.on_trial_result(None, a, {"m": 1.0, "images_seen": 100})
    s.on_trial_complete(None, b, {"m": math.inf, "images_seen": 40, "diverged": 1, "final": 1})
    assert s.stopped == {0: 100}
    hist = [("x", 0, 100, 1.0, False), ("y", 0, 100, 1.2, False), ("z", 1, 100, 0.9, False),
            ("w", 1, 100, 2.0, False)]
    r = GroupASHA("m", [100], 3, seeds_per_group=2, history=lambda: hist)
    r.on_trial_add(None, fake_trial("v", {"p2sweep_group": 2}))
    assert r.rung_means[100] == {0: pytest.approx(1.1), 1: pytest.approx(1.45)} and r.stopped == {1: 100}


# -- case 3: non-finite metric values are reported as +inf -----------------------------------------------------

@pytest.mark.parametrize("v", [float("nan"), float("inf"), float("-inf"), None])
def test_nonfinite_metric_is_reported_as_worst(v):
    from sweeps.record.trial_report import TrialReport

    r = TrialReport.make("rkid32_ddim5", v, 128, evals={"rfid32_ddim5": float("nan")}).to_result()
    assert r["rkid32_ddim5"] == math.inf and r["nonfinite_metric"] == 1 and r["ckpt_score"] == math.inf
    assert r["rfid32_ddim5"] == math.inf
    ok = TrialReport.make("rkid32_ddim5", 0.25, 128).to_result()
    assert ok["rkid32_ddim5"] == 0.25 and ok["nonfinite_metric"] == 0


# -- case 4: trials and results work from the validated config ---------------------------------------------------

def test_base_without_eval_section_gives_working_trial_configs(tmp_path):
    from sweeps.record.spec import parse_sweep
    from sweeps.tune.trainable import TrialInfo, run_config

    raw = smoke_raw()
    raw["base"] = {k: v for k, v in raw["base"].items() if k != "eval"}
    raw["base"]["diffusion"]["diffusion_steps"] = 1000  # the default sampling spec is 250 steps
    raw["metric"] = "kid10k_250"  # the defaults' metric name (Inception, 10k samples, 250 steps)
    spec = parse_sweep(raw, ROOT)
    assert "eval" in spec.base and spec.base["eval"]["num_samples"] == 10000
    cfg = run_config(spec.base, {"diffusion.p2_gamma": 1.0, "p2sweep_group": 0, "train.seed": 3},
                       TrialInfo(metric=spec.metric, cpu=2, cache_dir=str(tmp_path)))
    assert cfg.eval.cache_dir == str(tmp_path) and cfg.train.seed == 3 and cfg.train.num_threads == 2


# -- case 2: ranking with lost seeds, --scope best, export ---------------------------------------------------------

def _fake_sweep(tmp_path):
    from sweeps.record.meta import STATES

    d = str(tmp_path / "exp")
    m, o = "rkid32_ddim5", "rkid32_ddim10"
    states = dict([
        # group 0: both seeds complete, mean 0.5 at ddim5 and 0.6 at ddim10
        write_trial(d, "a0", 0, 0, [(128, {m: 0.6}), (384, {m: 0.5, o: 0.6})], "TERMINATED"),
        write_trial(d, "a1", 0, 1, [(128, {m: 0.6}), (384, {m: 0.5, o: 0.6})], "TERMINATED"),
        # group 1: seed 1 stopped at 128; its surviving seed has the best ddim10 value of all: must not win
        write_trial(d, "b0", 1, 0, [(128, {m: 0.5}), (384, {m: 0.1, o: 0.05})], "TERMINATED"),
        write_trial(d, "b1", 1, 1, [(128, {m: 0.9})], "STOPPED"),
        # group 2: its best point is 128 (0.3); --scope best must use 128 for every spec
        write_trial(d, "c0", 2, 0, [(128, {m: 0.3, o: 0.35}), (384, {m: 0.7, o: 0.2})], "TERMINATED"),
    ])
    os.makedirs(os.path.join(d, "trial_zz"))  # a trial directory Tune does not know (lost in a crash): ignored
    with open(os.path.join(d, "trial_zz", "result.json"), "w") as f:
        f.write(json.dumps({"trial_id": "zz", "config": {"p2sweep_group": 9}, "images_seen": 384, m: 0.0}) + "\n")
    with open(os.path.join(d, STATES), "w") as f:
        json.dump(states, f)
    return d


def test_rows_rank_on_seeds_at_the_same_point_and_lost_seeds_never_win(tmp_path):
    from sweeps.results.trials import group_rows, load_trials

    d = _fake_sweep(tmp_path)
    trials = load_trials(d, "rkid32_ddim5")
    assert sorted(t.trial_id for t in trials) == ["a0", "a1", "b0", "b1", "c0"]
    rows = group_rows(trials, "rkid32_ddim5", 384, seeds_expected=2)
    top = rows[0]
    assert (top.group, top.spec, top.n, top.lost, top.complete) == (0, "ddim5", 2, 0, True)
    assert top.mean == pytest.approx(0.5)
    by = {(r.group, r.spec): r for r in rows}
    b10 = by[1, "ddim10"]
    assert b10.n == 1 and b10.lost == 1 and not b10.complete  # only its surviving seed
    b5 = by[1, "ddim5"]
    assert b5.images_seen == 128 and b5.n == 2 and b5.mean == pytest.approx(0.7)  # both seeds, at the same point
    order = [(r.group, r.spec) for r in rows]
    assert order.index((0, "ddim10")) < order.index((1, "ddim10"))
    assert all(r.complete for r in rows[:2]) and all(not r.complete for r in rows[2:])
    best = {(r.group, r.spec): r for r in group_rows(trials, "rkid32_ddim5", 384, 2, scope="best")}
    assert best[2, "ddim5"].images_seen == 128 and best[2, "ddim10"].images_seen == 128
    assert best[2, "ddim10"].mean == pytest.approx(0.35)


def test_export_carries_the_trials_own_values_and_validates(tmp_path):
    from p2core.config import config_from_dict
    from sweeps.record.meta import Paths, SweepMeta
    from sweeps.results.trials import best_export_yaml, group_rows, load_trials
    from sweeps.record.spec import parse_sweep

    spec = parse_sweep(smoke_raw(), os.path.join(ROOT, "search_spaces"))
    d = _fake_sweep(tmp_path)
    trials = load_trials(d, "rkid32_ddim5")
    spec.seeds = [0, 1]
    assert spec.metric == "rkid32_ddim5" and spec.max_images == 384
    meta = SweepMeta(name="x", sweep_id="i", spec=spec, paths=Paths(str(tmp_path), "", "", ""), parent_run_id="",
                     experiment="x")
    row = group_rows(trials, "rkid32_ddim5", 384, 2)[0]
    cfg = config_from_dict(yaml.safe_load(best_export_yaml(meta, row, trials)))
    assert cfg.train.seed == 0 and cfg.train.lr == pytest.approx(0.001)
    row_b = [r for r in group_rows(trials, "rkid32_ddim5", 384, 2) if r.group == 1 and r.spec == "ddim10"][0]
    cfg = config_from_dict(yaml.safe_load(best_export_yaml(meta, row_b, trials)))
    assert cfg.train.seed == 0 and cfg.eval.sampling_steps == ["ddim10"] and cfg.metric == "rkid32_ddim10"


# -- case 8: MLflow errors never end the sweep ------------------------------------------------------------------------

class Flaky:
    """An MlflowClient that fails its first `n` write calls with "database is locked"."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if not callable(fn) or name.startswith(("get_", "search_")):
            return fn

        def call(*a, **kw):
            if self.n > 0:
                self.n -= 1
                raise RuntimeError("(sqlite3.OperationalError) database is locked")
            return fn(*a, **kw)
        return call


def test_mlflow_failures_are_retried_then_queued_and_written_at_finish(tmp_path, monkeypatch):
    from sweeps.tracking import callback as tcallback, client as tclient, repair as trepair, runs as truns

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    real = tclient.client(uri)
    flaky = Flaky(real, 0)
    for m in (tcallback, trepair):  # the clients the tracker and the repair at finish make
        monkeypatch.setattr(m, "client", lambda u: flaky)
    monkeypatch.setattr(tclient, "RETRY_DELAYS", (0.0, 0.0))
    exp = truns.ensure_experiment(real, "s")
    parent = real.create_run(exp).info.run_id
    exp_dir = str(tmp_path / "exp")
    tr = tcallback.MLflowTracker(uri, "s", parent, {"train.lr": 0.001}, "rkid32_ddim5", 384, "s", exp_dir)
    trial = types.SimpleNamespace(trial_id="t1", config={"p2sweep_group": 0, "train.seed": 0}, path=str(tmp_path),
                                  last_result={"images_seen": 384, "final": 1})
    flaky.n = 2  # fails twice, the third try (second retry) succeeds
    tr.on_trial_start(0, [], trial)
    flaky.n = 100  # down for longer than the retries: nothing raises into Tune, the metrics are queued
    tr.on_trial_result(0, [], trial, {"rkid32_ddim5": 0.5, "images_seen": 128, "train_log": "[]"})
    tr.on_trial_complete(0, [], trial)
    assert os.path.exists(os.path.join(exp_dir, trepair.PENDING))
    flaky.n = 0
    left = trepair.write_pending(uri, "s", parent, {"train.lr": 0.001}, "s", exp_dir, {"t1": str(tmp_path)})
    assert left == 0 and not os.path.exists(os.path.join(exp_dir, trepair.PENDING))
    trepair.reconcile(uri, "s", parent, {"t1": {"state": "TERMINATED", "images_seen": 384}}, 384)
    runs = [r for r in real.search_runs([exp]) if r.data.tags.get("p2sweep.role") == "trial"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.value for m in real.get_metric_history(runs[0].info.run_id, "rkid32_ddim5")] == [0.5]


# -- cases 10, 11, 12, 14 -----------------------------------------------------------------------------------------

def test_optuna_study_of_another_sweep_is_refused(tmp_path):
    import optuna

    from p2core.errors import UserError
    from sweeps.tune.schedulers import open_study

    url = f"sqlite:///{tmp_path}/o.db"
    foreign = optuna.create_study(study_name="demo-abcdef12", storage=url)
    foreign.set_user_attr("p2sweep.sweep_id", "someone-else")
    with pytest.raises(UserError, match="belongs to another sweep"):
        open_study(url, "demo-abcdef12", "abcdef12mine", create=True)
    mine = open_study(url, "demo-12345678", "12345678x", create=True)
    assert mine.user_attrs["p2sweep.sweep_id"] == "12345678x" and not mine.get_trials()
    from sweeps.record.meta import Paths, SweepMeta
    from sweeps.record.spec import SweepSpec

    m = SweepMeta("demo", SweepMeta.new_id(), SweepSpec("demo", {}, "m", {}), Paths("", "", "", ""), "", "demo")
    assert m.study_name != "demo" and m.study_name.startswith("demo-")  # never the bare sweep name


def test_local_ray_never_joins_a_running_cluster(monkeypatch):
    import ray

    from sweeps.tune import ray_env

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    ray_env.init_ray(None)
    assert calls[0]["address"] == "local" and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".", "..", "", "sp ace"])
def test_bad_names_are_refused_by_run_and_resume(name, tmp_path):
    from p2core.errors import UserError
    from sweeps.record.meta import validate_name
    from sweeps.commands.sweep import cmd_resume, cmd_run

    with pytest.raises(UserError, match="sweep name is letters"):
        validate_name(name)
    args = types.SimpleNamespace(sweep=os.path.join(ROOT, "search_spaces", "smoke.yaml"), set=[], cpus=None,
                                 gpus=None, name=name, time_budget=None, storage=str(tmp_path), dry_run=True,
                                 address=None, retry_errored=False)
    with pytest.raises(UserError):
        cmd_run(args)
    with pytest.raises(UserError):
        cmd_resume(args)
    assert os.listdir(tmp_path) == []
    assert validate_name("demo.v2") == "demo.v2"


def test_ui_turns_telemetry_off_before_mlflow_is_imported(tmp_path, monkeypatch):
    import subprocess

    from sweeps.commands.sweep import cmd_ui

    (tmp_path / "mlflow.db").write_bytes(b"")
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: seen.update(env=env, cmd=cmd) or 0)
    cmd_ui(types.SimpleNamespace(name=None, storage=str(tmp_path), host="127.0.0.1", port=5055))
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and seen["env"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert seen["cmd"][seen["cmd"].index("--host") + 1] == "127.0.0.1"


def test_example_cluster_uses_token_auth_and_no_usage_stats():
    with open(os.path.join(ROOT, "examples", "ray_cluster.yaml")) as f:
        text = f.read()
    cfg = yaml.safe_load(text)
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in c and "RAY_USAGE_STATS_ENABLED=0" in c for c in ray_starts)
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_gpu_above_one_and_bad_cpus_are_refused_with_the_key():
    from p2core.errors import UserError
    from sweeps.record.spec import parse_sweep

    with pytest.raises(UserError, match="resources.gpu"):
        parse_sweep(smoke_raw(resources={"cpu": 1, "gpu": 2}), os.path.join(ROOT, "search_spaces"))
    with pytest.raises(UserError, match="seeds"):
        parse_sweep(smoke_raw(seeds=[0, 0]), os.path.join(ROOT, "search_spaces"))


def test_searcher_limits_concurrency_itself_and_prunes_with_the_stopping_rung(tmp_path):
    """Tune answers STOP without calling the searcher's on_trial_result: the stopping rung's value reaches Optuna
    through on_trial_complete. Concurrency is counted in the searcher (Tune's ConcurrencyLimiter would drop the
    completion of an errored trial that `resume --retry-errored` runs again)."""
    import optuna

    from sweeps.tune.schedulers import GroupSearcher

    s = GroupSearcher({"diffusion.p2_gamma": ("uniform", [0.0, 2.0])}, "optuna", 2, [0, 1], "m",
                      optuna_url=f"sqlite:///{tmp_path}/o.db", study_name="s", sweep_id="i", max_concurrent=2)
    s.suggest("a"), s.suggest("b")
    assert s.suggest("c") is None  # two live trials: wait
    s.on_trial_result("a", {"m": 0.4, "images_seen": 128})
    s.on_trial_complete("b", {"m": 0.6, "images_seen": 128, "final": 0})  # stopped at the rung
    s.on_trial_complete("a", {"m": 0.4, "images_seen": 256, "final": 0})
    t = s.study.get_trials()[0]
    assert t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values == {128: pytest.approx(0.5)}
    assert s.suggest("c")["p2sweep_group"] == 1


def test_group_asha_ends_a_seed_only_when_its_retries_are_used_up():
    from sweeps.tune.schedulers import GroupASHA

    s = GroupASHA("m", [100], 3, seeds_per_group=2)
    a = fake_trial("a", {"p2sweep_group": 0})
    b = types.SimpleNamespace(trial_id="b", config={"p2sweep_group": 0}, status="RUNNING",
                              should_recover=lambda: True)
    s.on_trial_result(None, a, {"m": 1.0, "images_seen": 100})
    s.on_trial_error(None, b)  # will be retried: not an ended seed
    assert s.stopped == {} and 0 not in s.rung_means[100]
    b.should_recover = lambda: False
    s.on_trial_error(None, b)  # out of retries: counts as +inf, the configuration is stopped
    assert s.stopped == {0: 100}


# -- issue 12: multi-fidelity rungs -------------------------------------------------------------------------------

def test_low_rung_report_carries_its_own_metric_and_never_ranks_as_the_sweep_metric(tmp_path):
    from sweeps.record.trial_report import TrialReport
    from sweeps.results.trials import load_trials, rung_history

    low = TrialReport.make("fid10k_250", None, 100, evaluated=False, rung_metric="kid1k_ddim10", rung_value=0.07,
                           evals={"kid1k_ddim10": 0.07})
    r = low.to_result()
    assert "fid10k_250" not in r and r["ckpt_score"] == math.inf and r["nonfinite_metric"] == 0
    assert (r["rung_metric"], r["rung_score"]) == ("kid1k_ddim10", 0.07)
    back = TrialReport.from_result("fid10k_250", r)
    assert back.value is None and not back.evaluated and back.rung_value == 0.07 and not back.failed_value
    top = TrialReport.make("fid10k_250", 12.5, 300, final=True, evals={"fid10k_250": 12.5}).to_result()
    assert top["rung_metric"] == "fid10k_250" and top["rung_score"] == top["ckpt_score"] == 12.5
    bad = TrialReport.make("fid10k_250", None, 100, evaluated=False, rung_metric="kid1k_ddim10",
                           rung_value=float("nan")).to_result()
    assert bad["rung_score"] == math.inf and bad["nonfinite_metric"] == 1
    # the results reader: history and ranking see the sweep metric only; ASHA's rebuild sees the rung scores
    d = tmp_path / "t1"
    d.mkdir()
    cfg = {"p2sweep_group": 0, "train.seed": 0}
    with open(d / "result.json", "w") as f:
        for i, x in enumerate((r, top)):
            f.write(json.dumps({**x, "trial_id": "t1", "config": cfg, "reported_at": i}) + "\n")
    (t,) = load_trials(str(tmp_path), "fid10k_250")
    assert t.history == [(300, 12.5)] and t.points[100] == {"kid1k_ddim10": 0.07} and t.best == 12.5
    assert rung_history(str(tmp_path), "fid10k_250") == [("t1", 0, 100, 0.07, False), ("t1", 0, 300, 12.5, False)]


def test_group_asha_and_optuna_use_the_rung_score_at_low_rungs(tmp_path):
    import optuna
    from ray.tune.schedulers import TrialScheduler as TS

    from sweeps.tune.schedulers import GroupASHA, GroupSearcher

    s = GroupASHA("m", [100], 3, seeds_per_group=1)
    a, b = fake_trial("a", {"p2sweep_group": 0}), fake_trial("b", {"p2sweep_group": 1})
    low = lambda v: {"rung_score": v, "rung_metric": "cheap", "ckpt_score": math.inf, "images_seen": 100}
    assert s.on_trial_result(None, a, low(0.1)) == TS.CONTINUE
    assert s.on_trial_result(None, b, low(0.9)) == TS.STOP  # judged on the cheap metric: no "m" at this rung
    assert s.rung_means[100] == {0: pytest.approx(0.1), 1: pytest.approx(0.9)}
    o = GroupSearcher({"diffusion.p2_gamma": ("uniform", [0.0, 2.0])}, "optuna", 2, [0], "m",
                      optuna_url=f"sqlite:///{tmp_path}/o.db", study_name="s", sweep_id="i")
    o.suggest("a"), o.suggest("b")
    o.on_trial_result("a", low(0.1))
    o.on_trial_complete("a", {"m": 5.0, "rung_score": 5.0, "images_seen": 300, "final": 1})
    o.on_trial_complete("b", low(0.9))
    done, pruned = o.study.get_trials()
    assert done.state == optuna.trial.TrialState.COMPLETE and done.value == 5.0  # the top fidelity only
    assert done.intermediate_values == {100: pytest.approx(0.1), 300: pytest.approx(5.0)}
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.intermediate_values == {100: pytest.approx(0.9)}


def test_rung_metrics_map_to_the_low_rungs_and_show_in_the_dry_run():
    from sweeps.record.spec import describe, parse_sweep

    raw = smoke_raw(scheduler={"type": "asha", "grace_period_images": 32, "reduction_factor": 2,
                               "rung_metrics": ["rkid8_ddim5", "rfid16_ddim10"]})
    spec = parse_sweep(raw, os.path.join(ROOT, "search_spaces"))
    assert spec.milestones() == [32, 64, 128, 256]
    assert spec.rung_metric_map() == {32: "rkid8_ddim5", 64: "rfid16_ddim10"}
    text = describe(spec)
    assert "rung 32: judged on rkid8_ddim5" in text and "rung 128: judged on rkid32_ddim5" in text
    # evaluations at 32, 64, 128, 256 and the end (384: both specs): 8 + 16 + 32 + 32 + 2 x 32 images generated
    assert "5 evaluations at [32, 64, 128, 256, 384], 152 images generated" in text


def test_scheduler_and_searcher_pickled_before_rung_scores_still_resume(tmp_path):
    """tuner.pkl of a sweep started by an older p2sweep holds objects without `sweep_metric`."""
    import pickle

    from sweeps.tune.schedulers import GroupASHA, GroupSearcher

    s = GroupASHA("m", [100], 3, seeds_per_group=1)
    state = s.__getstate__()
    state.pop("sweep_metric")
    state["_metric"] = "m"
    old = GroupASHA.__new__(GroupASHA)
    old.__setstate__(state)
    assert (old.metric, old.sweep_metric) == ("rung_score", "m")
    old.on_trial_result(None, fake_trial("a", {"p2sweep_group": 0}), {"m": 0.5, "images_seen": 100})
    assert old.rung_means[100] == {0: 0.5}
    o = GroupSearcher({"diffusion.p2_gamma": ("grid", [0.0])}, "grid", 1, [0], "m")
    state = pickle.loads(pickle.dumps(o)).__dict__
    state.pop("sweep_metric")
    state["_metric"] = "m"
    old = GroupSearcher.__new__(GroupSearcher)
    old.__setstate__(state)
    assert (old.metric, old.sweep_metric) == ("rung_score", "m")


@pytest.mark.parametrize("change,needle", [
    ({"space": {"train.batch_size": {"grid": [16, 32]}}}, "searched train.batch_size"),
    ({"scheduler": {"type": "asha", "grace_period_images": 16, "reduction_factor": 2,
                    "rung_metrics": ["rkid8_ddim5"]}}, "less than one batch"),
])
def test_rung_metrics_refuse_rungs_a_step_could_merge(change, needle):
    from p2core.errors import UserError
    from sweeps.record.spec import parse_sweep

    raw = smoke_raw(scheduler={"type": "asha", "grace_period_images": 128, "rung_metrics": ["rkid8_ddim5"]})
    raw.update(change)
    if "space" in change:
        raw["space"] = {**smoke_raw()["space"], **change["space"]}
    with pytest.raises(UserError, match=needle):
        parse_sweep(raw, os.path.join(ROOT, "search_spaces"))


def test_metric_name_helpers_by_hand():
    """p2core.metrics is the one home of a name's family, its sampling-steps label, either spelling of a count and
    which metric an evaluation point is judged on (results, report, `compare` and the trainer/trainable use them)."""
    from p2core.metrics import (family_of, judged_on, metrics_at, same_family, same_metric, steps_from_label,
                                steps_label)

    assert steps_label("10,15,20") == "10-15-20" and steps_label("ddim25") == "ddim25" and steps_label(250) == "250"
    assert steps_from_label("10-15-20") == "10,15,20" and steps_from_label("ddim25") == "ddim25"
    assert same_family("kid1k_ddim10", "kid1k_250") and same_family("kid1000_250", "kid1k_ddim10")
    assert not same_family("fid1k_250", "kid1k_250") and not same_family("kid512_250", "kid1k_250")
    assert not same_family("rkid1k_250", "kid1k_250") and not same_family("loss", "kid1k_250")
    assert not same_family("images_seen", "kid1k_250") and not same_family("gen_images_250", "kid1k_250")
    names = ["loss", "kid1k_ddim10", "fid1k_250", "kid1k_250", "kid512_250", "kid1k_10-15-20", "kid1k_ddim10"]
    assert family_of(names, "kid1k_250") == ["kid1k_250", "kid1k_10-15-20", "kid1k_ddim10"]
    assert family_of(iter(names), "kid1k_ddim10") == ["kid1k_ddim10", "kid1k_10-15-20", "kid1k_250"]
    assert family_of(["loss"], "kid1k_250") == []
    assert same_metric("kid1000_ddim25", "kid1k_ddim25") and same_metric("kid1k_ddim25", "kid1k_ddim25")
    assert not same_metric("kid1k_ddim25", "kid1k_ddim10") and not same_metric("cheap", "kid1k_ddim25")
    assert same_metric("cheap", "cheap")
    pm = {32: ["rkid8_ddim5"], 96: ["rfid16_ddim10"]}
    assert judged_on([32], pm, "rkid32_ddim5") == "rkid8_ddim5"
    assert judged_on([32, 96], pm, "rkid32_ddim5") == "rfid16_ddim10"  # the highest low rung it answers
    assert judged_on([32, 288], pm, "rkid32_ddim5") == "rkid8_ddim5"
    assert judged_on([288], pm, "rkid32_ddim5") == "rkid32_ddim5" and judged_on([], pm, "rkid32_ddim5") == "rkid32_ddim5"
    assert metrics_at([32], pm) == (["rkid8_ddim5"], False)
    assert metrics_at([32, 96], pm) == (["rkid8_ddim5", "rfid16_ddim10"], False)
    assert metrics_at([32, 288], pm) == (["rkid8_ddim5"], True)  # 288 has no own metric: the tracked one too
    assert metrics_at([32], pm, final=True) == (["rkid8_ddim5"], True)
    assert metrics_at([], pm) == ([], True) and metrics_at([288], {}) == ([], True)


def test_replicate_is_the_one_reader_of_a_trials_group_and_seed():
    from sweeps.record.replicate import GROUP_KEY, SEED_KEY, Replicate, config_key, config_values

    assert (GROUP_KEY, SEED_KEY) == ("p2sweep_group", "train.seed")  # the names in Tune's configs and MLflow
    r = Replicate.of({"diffusion.p2_gamma": 1.0, "p2sweep_group": 3, "train.seed": 7})
    assert (r.group, r.seed, r.params, r.key) == (3, 7, {"diffusion.p2_gamma": 1.0}, "3:7")
    assert r.shown == ("3", "7") and r.config_key == 3
    assert r.config() == {"diffusion.p2_gamma": 1.0, "train.seed": 7, "p2sweep_group": 3}
    assert Replicate.of(r.config()) == r and Replicate(group=3, seed=7, params={"diffusion.p2_gamma": 1.0}) == r
    bare = Replicate.of({"train.lr": 0.001})  # a trial without the group key (nor a seed): its values are its key
    assert (bare.group, bare.seed, bare.key, bare.shown) == (-1, 0, "-:-", ("-", "-"))
    assert bare.config_key == '{"train.lr": 0.001}' == config_key(-1, {"train.lr": 0.001})
    assert Replicate.of(None).key == "-:-" and Replicate.of({"train.seed": 2}).key == "-:2"
    assert config_values({"p2sweep_group": 1, "train.seed": 2, "a.b": 3}) == {"train.seed": 2, "a.b": 3}


def test_trial_config_is_the_base_with_the_trials_values_validated():
    from p2core.errors import UserError
    from sweeps.record.replicate import trial_config
    from sweeps.record.spec import parse_sweep

    spec = parse_sweep(smoke_raw(), os.path.join(ROOT, "search_spaces"))
    cfg = trial_config(spec.base, {"diffusion.p2_gamma": 1, "p2sweep_group": 4, "train.seed": 9})
    assert cfg.diffusion.p2_gamma == 1.0 and isinstance(cfg.diffusion.p2_gamma, float) and cfg.train.seed == 9
    assert cfg.metric == spec.metric and cfg.eval.num_samples == spec.base["eval"]["num_samples"]
    assert trial_config({}, {"diffusion.noise_schedule": "cosine"}).diffusion.p2_k == 1.0  # the defaults filled in
    with pytest.raises(UserError, match="diffusion.noise_schedule"):
        trial_config(spec.base, {"diffusion.noise_schedule": "quad"})


def test_metric_names_are_the_evaluators_spelling(tmp_path):
    """`kid1000_ddim25` and `kid1k_ddim25` are one metric: a sweep keeps the evaluator's spelling, so the name it
    looks up in a trial's report is the one the trial reports (a sweep spelled `1000` once saw no value at all)."""
    from p2core.metrics import canonical_metric_name
    from p2core.errors import UserError
    from sweeps.record.meta import load_meta
    from sweeps.record.spec import load_sweep

    assert canonical_metric_name("kid1000_ddim25") == "kid1k_ddim25"
    assert canonical_metric_name("fid10000_50-25-25") == "fid10k_50-25-25"
    assert canonical_metric_name("rkid32_ddim5") == "rkid32_ddim5"
    d = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))
    d["base"]["eval"]["num_samples"] = 1000
    d["metric"] = "rkid1000_ddim5"
    d["scheduler"] = {"type": "asha", "grace_period_images": 128, "rung_metrics": ["rkid2000_ddim10"]}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    spec = load_sweep(str(p), {})
    assert spec.metric == "rkid1k_ddim5" and spec.base["metric"] == "rkid1k_ddim5"
    assert spec.scheduler.rung_metrics == ["rkid2k_ddim10"]
    # a sweep stored by a p2sweep of before the nested record (p2sweep.json version 1: the sweep file's mapping
    # and the validated base config) with the other spelling reads back, with the evaluator's
    os.makedirs(tmp_path / "old")
    v1 = {"name": "old", "sweep_id": "x", "metric": "rkid1000_ddim5", "max_images": 384, "base": spec.base,
          "source_yaml": "metric: rkid1000_ddim5",
          # its baseline's checkpoint was on the machine that started it, not here: it was evaluated then
          "raw": dict(d, overrides={"train.lr": 0.001}, baselines=[{"name": "off", "checkpoint": "/gone/ema.pt"}]),
          "paths": {"storage": str(tmp_path), "mlflow_uri": "", "optuna_storage": "", "cache_dir": ""},
          "parent_run_id": "", "experiment": "old", "sweep_dir": os.path.join(ROOT, "search_spaces"),
          "address": None, "seeds": [0]}
    (tmp_path / "old" / "p2sweep.json").write_text(json.dumps(v1))
    old = load_meta("old", str(tmp_path))
    assert old.metric == "rkid1k_ddim5" and old.spec.scheduler.rung_metrics == ["rkid2k_ddim10"]
    assert old.spec.overrides == {"train.lr": 0.001} and old.spec.source_yaml == "metric: rkid1000_ddim5"
    old.save()  # written back as version 2; it reads back the same
    assert load_meta("old", str(tmp_path)).spec == old.spec
    assert json.load(open(tmp_path / "old" / "p2sweep.json"))["version"] == 2
    assert old.spec.baselines == [{"name": "off", "checkpoint": "/gone/ema.pt", "overrides": {}}]
    # a damaged record is one line naming the file, never a traceback
    bad = json.load(open(tmp_path / "old" / "p2sweep.json"))
    bad["sweep"]["space"]["diffusion.p2_gamma"] = {}
    (tmp_path / "old" / "p2sweep.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="p2sweep.json: not a p2sweep metadata file"):
        load_meta("old", str(tmp_path))


# -- issue 21: scheduler.ema_rule best: one EMA per configuration --------------------------------------------------

def test_group_score_takes_the_ema_of_lowest_mean_over_the_seeds():
    from sweeps.record.trial_report import group_score

    assert group_score([0.2, 0.4]) == pytest.approx(0.3) and group_score([0.2, math.inf]) == math.inf
    # seed 0 is best at 0.05, seed 1 at the tracked EMA; each seed's own minimum would average 0.255, a value no
    # single EMA has: the configuration's score is its best EMA over both seeds, 0.05 with mean 0.27
    a, b = {"tracked": 0.30, "0.05": 0.25}, {"tracked": 0.26, "0.05": 0.29}
    assert group_score([a, b]) == pytest.approx(0.27)
    assert group_score([a, {"tracked": 0.26, "0.05": math.inf}]) == pytest.approx(0.28)  # 0.05 diverged: tracked
    assert group_score([a, math.inf]) == math.inf  # a seed that raised is +inf at every EMA
    from sweeps.record.trial_report import group_choice

    assert group_choice([a, b]) == (pytest.approx(0.27), "0.05") and group_choice([0.2, 0.4])[1] is None
    assert group_choice([a, 0.26]) == (pytest.approx(0.28), "tracked")  # a plain value is the tracked EMA's


def test_ema_rule_best_in_reports_asha_and_optuna(tmp_path):
    import optuna

    from sweeps.record.trial_report import TrialReport
    from sweeps.tune.schedulers import GroupASHA
    from sweeps.tune.trainable import rung_candidates

    rec = {"m": 0.30, "m_ema0.05": 0.25}
    assert rung_candidates(rec, "m", [0.05], "tracked") == {}
    assert rung_candidates(rec, "m", [0.05], "best") == {"tracked": 0.30, "0.05": 0.25}
    r = TrialReport.make("m", 0.30, 100, rung_candidates={"tracked": 0.30, "0.05": float("nan")}, evals=rec)
    res = r.to_result()
    assert res["rung_score"] == res["ckpt_score"] == 0.30  # the tracked EMA's numbers stay as they were
    back = TrialReport.from_result("m", res)
    assert back.judged == {"tracked": 0.30, "0.05": math.inf} and "rung_candidates" not in back.evals
    assert TrialReport.from_result("m", TrialReport.make("m", 0.3, 100).to_result()).judged == 0.3
    # ASHA: configuration 0's seeds are best at different EMAs; it is judged at 0.05 over both (0.27)
    s = GroupASHA("m", [100], 2, seeds_per_group=2)
    cands = {"t00": {"tracked": 0.30, "0.05": 0.25}, "t01": {"tracked": 0.26, "0.05": 0.29},
             "t10": {"tracked": 0.40, "0.05": 0.41}, "t11": {"tracked": 0.42, "0.05": 0.43}}
    for tid, c in cands.items():
        t = fake_trial(tid, {"p2sweep_group": int(tid[1])})
        s.on_trial_add(None, t)
        s.on_trial_result(None, t, TrialReport.make("m", c["tracked"], 100, rung_candidates=c).to_result())
    assert s.rung_means[100] == {0: pytest.approx(0.27), 1: pytest.approx(0.41)} and s.stopped == {1: 100}
    assert "m (EMA 0.05) 0.27" in s.decision_line(0, 100, 0.27, None, False, "0.05")
    # Optuna is told the same rule's value at the end
    o = _optuna_searcher(tmp_path, [0, 1], n=1)
    o.suggest("a")
    o.suggest("b")
    for tid, c in (("a", cands["t00"]), ("b", cands["t01"])):
        o.on_trial_complete(tid, TrialReport.make("m", c["tracked"], 384, final=True, rung_candidates=c).to_result())
    (t,) = o.study.get_trials()
    assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(0.27)
    # a NaN of the tracked EMA alone: the configuration is still scored on its other EMAs
    o2 = _optuna_searcher(tmp_path / "b", [0], n=1)
    os.makedirs(tmp_path / "b")
    o2.suggest("c")
    o2.on_trial_complete("c", TrialReport.make("m", float("nan"), 384, final=True,
                                               rung_candidates={"tracked": float("nan"), "0.05": 0.2}).to_result())
    assert o2.study.get_trials()[0].value == pytest.approx(0.2)


def test_ema_rule_best_status_and_console_show_what_asha_compared(tmp_path):
    """Under ema_rule best a configuration's seeds are compared at one EMA, chosen over the seeds together at each
    rung from each seed's first report at or after it (a seed that got there first trains on to its next report),
    a seed that diverged before it counting +inf: the status table (and so the report's stopped seeds) and the
    console's rung cell show each seed's value as ASHA compared it. Configuration 0: at the 128-image rung 0.05
    wins (mean 0.27 against 0.28), so seed 0 shows 0.25 at 128, neither its tracked 0.30 nor its later report at
    192 (where alone it would be judged at the tracked EMA, 0.10); seed 1 shows 0.29, not its tracked 0.26.
    Configuration 1: its seed 0 diverged at 64, so every EMA's mean is +inf and ASHA named the first, 0.05: seed 1
    shows 0.3 there, not its own best (tracked, 0.2)."""
    import io

    from sweeps.record.trial_report import TrialReport
    from sweeps.results.trials import load_trials, status_rows
    from sweeps.tune.console import SweepConsole

    def rep(images, c=None, diverged=False):
        if diverged:
            return TrialReport.make("m", float("inf"), images, final=True, diverged=True).to_result()
        return TrialReport.make("m", None, images, evaluated=False, rung_metric="r", rung_value=c["tracked"],
                                rung_candidates=c, evals={"r": c["tracked"], "r_ema0.05": c["0.05"]}).to_result()

    reports = {(0, 0): [rep(128, {"tracked": 0.30, "0.05": 0.25}), rep(192, {"tracked": 0.10, "0.05": 0.50})],
               (0, 1): [rep(128, {"tracked": 0.26, "0.05": 0.29})],
               (1, 0): [rep(64, diverged=True)],
               (1, 1): [rep(128, {"tracked": 0.20, "0.05": 0.30})]}
    d = tmp_path / "sw"
    results = {}
    for (g, seed), rows in reports.items():
        cfg = {"train.lr": 0.001 * (g + 1), "p2sweep_group": g, "train.seed": seed}
        results[(g, seed)] = [dict(r, trial_id=f"t{g}{seed}", config=cfg) for r in rows]
        os.makedirs(d / f"t{g}{seed}")
        (d / f"t{g}{seed}" / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results[(g, seed)]))
    want = {"t00": (128, "r_ema0.05", 0.25), "t01": (128, "r_ema0.05", 0.29), "t11": (128, "r_ema0.05", 0.30)}
    trials = load_trials(str(d), "m", milestones=[128])
    assert {t.trial_id: t.last_rung for t in trials if t.trial_id in want} == want
    assert next(t for t in trials if t.trial_id == "t10").state == "DIVERGED"
    header, rows = status_rows(trials, "m")
    cells = {r[0]: r[-1] for r in rows}
    assert cells["t00"] == "r_ema0.05 = 0.25 at 128" and cells["t11"] == "r_ema0.05 = 0.3 at 128", cells
    # without the milestones (the rungs are the spec's), each trial shows its own last report, as before
    assert next(t for t in load_trials(str(d), "m") if t.trial_id == "t00").last_rung == (192, "r", 0.10)
    # the console, live, in the order the reports came
    con = SweepConsole("m", 384, ["train.lr"], stream=io.StringIO(), milestones=[128])
    order = [((0, 0), 0), ((0, 1), 0), ((0, 0), 1), ((1, 0), 0), ((1, 1), 0)]
    for (g, seed), i in order:
        res = results[(g, seed)][i]
        t = types.SimpleNamespace(trial_id=f"t{g}{seed}", config=res["config"], status="RUNNING", last_result=res)
        con.on_trial_result(0, [], t, res)
        if res.get("diverged"):
            con.on_trial_complete(0, [], t)
    got = {tid: r["rung"] for tid, r in con._rows.items()}
    assert got["t00"] == "128: r_ema0.05 0.25" and got["t01"] == "128: r_ema0.05 0.29", got
    assert got["t11"] == "128: r_ema0.05 0.3", got


def test_ema_rule_best_is_refused_with_a_searched_ema():
    from p2core.errors import UserError
    from sweeps.record.spec import parse_sweep

    raw = smoke_raw(scheduler={"type": "asha", "grace_period_images": 128, "ema_rule": "best"})
    raw["base"]["train"]["ema"] = {"type": "power", "snapshot_every_images": 64}
    raw["base"]["eval"]["ema_sigma_rels"] = [0.07]
    assert parse_sweep(raw, os.path.join(ROOT, "search_spaces")).scheduler.ema_rule == "best"
    raw["space"] = {"eval.ema_sigma_rels": {"choice": [[0.07], [0.07, 0.15]]}}
    with pytest.raises(UserError, match="scheduler.ema_rule: best cannot be combined with a searched eval.ema_sig"):
        parse_sweep(raw, os.path.join(ROOT, "search_spaces"))
