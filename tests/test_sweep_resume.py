"""Sweeps that stop early, on a local Ray of this module (split from test_sweep.py so that the two run side by side
under `make test`'s two workers): a start that fails leaves nothing behind, errored trials stay errored unless
asked, a time budget stops cleanly and resume finishes."""
import json
import os
import time

import yaml

from helpers import ROOT, cli, mlflow_runs, sweep, sweep_file


# -- case 6: a run that fails before it can start leaves nothing behind ----------------------------------------------

def _nothing_written(storage, name):
    assert not os.path.exists(os.path.join(storage, name))
    if os.path.exists(os.path.join(storage, "mlflow.db")):
        from mlflow.tracking import MlflowClient

        c = MlflowClient(f"sqlite:///{storage}/mlflow.db")
        exp = c.get_experiment_by_name(name)
        assert exp is None or not c.search_runs([exp.experiment_id])  # deleted runs are not listed


def test_failed_starts_leave_nothing_behind(tmp_path, ray_session, monkeypatch, capsys):
    storage = str(tmp_path / "store")
    # a GPU share on a machine whose Ray has no GPU (this one), or more CPUs than any node: Ray would let the trials
    # pend for ever; p2sweep says which key at once
    p = sweep_file(str(tmp_path), "fs")
    for flag, value, needle in (("--gpus", "0.5", "resources.gpu 0.5"), ("--cpus", "64", "resources.cpu 64")):
        capsys.readouterr()
        t0 = time.monotonic()
        assert sweep(ray_session, "run", p, "--storage", storage, flag, value) == 2
        err = capsys.readouterr().err
        assert time.monotonic() - t0 < 30 and needle in err and "Ray sees 1 node(s): 2 CPU" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        _nothing_written(storage, "fs")
    # a tracking server with nothing listening: MLflow's client would retry for minutes; one line in seconds
    capsys.readouterr()
    t0 = time.monotonic()
    p = sweep_file(str(tmp_path), "fs", tracking={"mlflow_uri": "http://127.0.0.1:9"})
    assert sweep(ray_session, "run", p, "--storage", storage) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 30 and "http://127.0.0.1:9" in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(os.path.join(storage, "fs"))
    p = sweep_file(str(tmp_path), "fs", tracking={"optuna_storage": "sqlite:////nonexistent/dir/o.db"},
                   search={"algorithm": "optuna", "num_samples": 2}, space={"diffusion.p2_gamma": {"choice": [0.0]}})
    r = cli("run", p, "--storage", storage)
    assert r.returncode == 2 and "tracking.optuna_storage" in r.stderr and "Traceback" not in r.stderr
    _nothing_written(storage, "fs")
    p = sweep_file(str(tmp_path), "fs")
    r = cli("run", p, "--storage", storage, "--address", "127.0.0.1:1")
    assert r.returncode == 2 and "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr
    _nothing_written(storage, "fs")
    # Ctrl-C while the driver evaluates baselines (the MLflow parent run exists by then)
    from sweeps.record import baselines

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(baselines, "evaluate", interrupted)
    p = sweep_file(str(tmp_path), "fs", baselines=[{"name": "b", "checkpoint": p}])
    assert sweep(ray_session, "run", p, "--storage", storage) == 130
    _nothing_written(storage, "fs")


# -- case 9 (and 12): errored trials stay errored unless asked ---------------------------------------------------------

def test_errored_trials_are_retried_only_with_retry_errored(tmp_path, ray_session, capsys):
    p = sweep_file(str(tmp_path), "err", space={"diffusion.p2_gamma": {"grid": [0.0]}}, max_failures=0,
                   scheduler={"type": "none"})
    storage = str(tmp_path / "store")
    crash = {"crash_at": 100, "crash_always": True}
    assert sweep(ray_session, "run", p, "--storage", storage, "--name", "err.v2", faults=crash) == 0
    from sweeps.results.trials import known_states

    d = os.path.join(storage, "err.v2")
    (st,) = known_states(d).values()
    assert st["state"] == "ERROR"
    capsys.readouterr()
    assert sweep(ray_session, "status", "err.v2", "--storage", storage) == 0
    assert "--retry-errored" in capsys.readouterr().out
    assert sweep(ray_session, "resume", "err.v2", "--storage", storage, faults=crash) == 0
    (st2,) = known_states(d).values()
    assert st2["state"] == "ERROR" and st2["failures"] == st["failures"]  # no new attempt
    assert sweep(ray_session, "resume", "err.v2", "--storage", storage, "--retry-errored") == 0
    (st3,) = known_states(d).values()
    assert st3["state"] == "TERMINATED"
    c, runs = mlflow_runs(storage, "err.v2")
    assert len([x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]) == 1
    assert not [x for x in runs if x.info.status == "RUNNING"]


def test_time_budget_stops_cleanly_and_resume_finishes(tmp_path, ray_session, capsys, monkeypatch):
    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    base["train"]["total_images"] = 1024  # about 15 s per trial here: the 6 s budget ends the sweep mid-way
    base["train"]["eval_every_images"] = 512
    p = sweep_file(str(tmp_path), "budget", base=base, space={"diffusion.p2_gamma": {"grid": [0.0, 1.0]}},
                   scheduler={"type": "none"})
    storage = str(tmp_path / "store")
    capsys.readouterr()
    assert sweep(ray_session, "run", p, "--storage", storage, "--time-budget", "6s") == 0
    out = capsys.readouterr()
    assert "time budget" in out.err and "p2sweep resume budget" in out.out
    states = json.load(open(os.path.join(storage, "budget", "p2sweep_trials.json")))
    assert len(states) == 2 and any(v["state"] in ("RUNNING", "PENDING", "PAUSED") for v in states.values())
    c, runs = mlflow_runs(storage, "budget")
    assert not [x for x in runs if x.info.status == "RUNNING"]
    # a resume that cannot place one trial (as if the sweep asked for half a GPU: this machine has none) fails with
    # one line before it writes anything: the parent run stays KILLED, p2sweep.json as it was
    meta_file = os.path.join(storage, "budget", "p2sweep.json")
    kept = open(meta_file).read()
    gpu = json.loads(kept)
    gpu["sweep"]["resources"] = {"cpu": 1.0, "gpu": 0.5}
    with open(meta_file, "w") as f:
        json.dump(gpu, f)
    asked = open(meta_file).read()
    assert sweep(ray_session, "resume", "budget", "--storage", storage) == 2
    assert "resources.gpu" in capsys.readouterr().err and open(meta_file).read() == asked
    c, runs = mlflow_runs(storage, "budget")
    assert next(x for x in runs if x.data.tags.get("p2sweep.role") == "sweep").info.status == "KILLED"
    # ... and the sweep was started by an earlier p2sweep, whose p2sweep.json (version 1) kept the sweep file's
    # mapping instead of the nested record: it resumes, and is rewritten as version 2
    v2 = json.loads(kept)
    rec = v2.pop("sweep")
    v2.pop("version")
    v1 = dict(v2, metric=rec["metric"], max_images=rec["scheduler"]["max_images"], base=rec["base"],
              source_yaml=rec["source_yaml"], raw=yaml.safe_load(open(p)), seeds=rec["seeds"])
    with open(meta_file, "w") as f:
        json.dump(v1, f)
    # the driver died between Tune's save of its trials and its save of the searcher (two files, copied to the
    # storage one by one): the experiment state lacks a trial the searcher handed out. It must run all the same
    # (it did not: the searcher counted it as live and the resume ended with one trial)
    import glob

    from sweeps.storage.tune_state import newest_experiment_state

    exp_state = newest_experiment_state(os.path.join(storage, "budget"))
    data = json.load(open(exp_state))
    lost = json.loads(data["trial_data"].pop()[0])["trial_id"]
    with open(exp_state, "w") as f:
        json.dump(data, f)
    assert glob.glob(os.path.join(storage, "budget", "searcher-state-*.pkl"))
    # resumed from a machine five hours behind the one that started it: Tune names its state files by the driver's
    # local time, so without a pinned zone the newer state sorts first and the finished trials read as RUNNING
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    try:
        assert sweep(ray_session, "resume", "budget", "--storage", storage) == 0
    finally:
        monkeypatch.undo()
        time.tzset()
    assert json.load(open(meta_file))["version"] == 2 and json.load(open(meta_file))["sweep"] == rec
    states = json.load(open(os.path.join(storage, "budget", "p2sweep_trials.json")))
    assert len(states) == 2 and lost not in states and {v["state"] for v in states.values()} == {"TERMINATED"}
    assert sorted(v["config"]["diffusion.p2_gamma"] for v in states.values()) == [0.0, 1.0]
    c, runs = mlflow_runs(storage, "budget")
    kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
    assert len(kids) == 2 and all(x.info.status == "FINISHED" for x in runs)
    assert not os.path.exists(os.path.join(ROOT, "mlruns"))
