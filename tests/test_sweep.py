"""End-to-end sweeps on a local Ray (loopback, usage stats off) around the real p2core trainer."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from test_config_cli import ROOT

ENV = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
           RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TQDM_DISABLE="1")


def sweep_file(tmp, name, **changes):
    with open(os.path.join(ROOT, "search_spaces", "smoke.yaml")) as f:
        d = yaml.safe_load(f)
    d["name"] = name
    for k, v in changes.items():
        d[k] = v
    p = os.path.join(tmp, f"{name}.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(d, f)
    return p


def cli(*args, timeout=400):
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=timeout)


def mlflow_runs(storage, name):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = c.get_experiment_by_name(name)
    return c, c.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """4 trials, run one at a time so that ASHA's decision is deterministic: lr 1e-3 (good) then 0.3 (a bad arm: samples far off at the first rung),
    each with and without a NaN injected at 200 images; every trial also crashes once at 200 images."""
    import torch

    from p2core.config import config_from_dict
    from p2core.trainer import Trainer

    tmp = str(tmp_path_factory.mktemp("sweep"))
    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    # two baseline rows: a p2sweep checkpoint and a bare (official-style) EMA state_dict of the same network
    bcfg = config_from_dict({**base, "train": {**base["train"], "total_images": 64},
                             "eval": {**base["eval"], "enabled": False}})
    Trainer(bcfg, os.path.join(tmp, "pre"), progress=False).run()
    ck = os.path.join(tmp, "pre", "checkpoints", "ckpt_000000000064.pt")
    torch.save(torch.load(ck, weights_only=True)["ema"], os.path.join(tmp, "ema_0.9999_000064.pt"))
    base["train"]["inject_crash_at_images"] = 200
    p = sweep_file(tmp, "faulty", base=base,
                   space={"train.lr": {"grid": [1.0e-3, 0.3]}, "train.inject_nan_at_images": {"grid": [0, 200]}},
                   search={"algorithm": "grid", "max_concurrent": 1},
                   baselines=[{"name": "ours64", "checkpoint": ck},
                              {"name": "official_style", "checkpoint": "ema_0.9999_000064.pt"}])
    storage = os.path.join(tmp, "store")
    t0 = time.perf_counter()
    r = cli("run", p, "--storage", storage)
    return {"r": r, "storage": storage, "seconds": time.perf_counter() - t0}


def trials_by_config(storage, name):
    from sweeps.results import load_trials

    d = os.path.join(storage, name)
    return {(t["config"]["train.lr"], t["config"]["train.inject_nan_at_images"]): t
            for t in load_trials(d, "rkid32_ddim5", 384)}


def test_sweep_runs_real_trainer_with_retry_divergence_and_asha(faulty):
    r = faulty["r"]
    assert r.returncode == 0, r.stderr[-3000:]
    t = trials_by_config(faulty["storage"], "faulty")
    assert len(t) == 4
    good = t[(1e-3, 0)]
    assert good["state"] == "TERMINATED" and good["images_seen"] == 384  # crashed at 200, retried from 128
    assert os.path.exists(os.path.join(good["dir"], "p2", ".injected_crash"))
    # checkpoints live only in Tune's checkpoint_* folders (2 kept), not as trainer files synced to storage
    import glob

    assert not glob.glob(os.path.join(good["dir"], "p2", "checkpoints", "*.pt"))
    assert len(glob.glob(os.path.join(good["dir"], "checkpoint_*"))) == 2
    div = t[(1e-3, 200)]
    assert div["state"] == "DIVERGED" and div["latest"] == float("inf")
    assert t[(0.3, 0)]["state"] == "STOPPED" and t[(0.3, 0)]["images_seen"] == 128  # ASHA stop at the first rung
    # every (trial, steps) pair of a full-length trial is in the results
    assert {"rkid32_ddim5", "rkid32_ddim10", "rfid32_ddim5", "rfid32_ddim10"} <= set(good["evals"])
    # the embedded Ray stays on loopback
    from sweeps.results import _read_results

    assert {x["node_ip"] for x in _read_results(os.path.join(good["dir"], "result.json"))} == {"127.0.0.1"}


def test_mlflow_one_run_per_trial_with_states(faulty):
    c, runs = mlflow_runs(faulty["storage"], "faulty")
    parents = [x for x in runs if x.data.tags.get("p2sweep.role") == "sweep"]
    kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
    assert len(parents) == 1 and len(kids) == 4
    assert len({x.data.tags["p2sweep.trial_id"] for x in kids}) == 4
    assert all(x.info.status != "RUNNING" for x in runs)
    by = {(float(x.data.params["train.lr"]), int(x.data.params["train.inject_nan_at_images"])): x for x in kids}
    assert by[(1e-3, 200)].info.status == "FAILED" and "diverged" in by[(1e-3, 200)].data.tags["p2sweep.failure"]
    assert by[(0.3, 0)].info.status == "FINISHED" and by[(0.3, 0)].data.tags["p2sweep.stopped_at_rung"] == "128"
    good = by[(1e-3, 0)]
    assert good.info.status == "FINISHED" and "rkid32_ddim10" in good.data.metrics
    assert good.data.params["diffusion.p2_gamma"] == "0.0" and good.data.params["model.num_channels"] == "32"
    hist = c.get_metric_history(good.info.run_id, "loss_cleanup")
    assert len(hist) >= 5 and max(m.step for m in hist) == 384
    arts = {a.path for a in c.list_artifacts(good.info.run_id)}
    assert {"trial_config.yaml", "weight_vs_snr.png", "samples", "loss.png"} <= arts
    base = [x for x in runs if x.data.tags.get("p2sweep.role") == "baseline"]
    assert sorted(x.data.tags["p2sweep.baseline"] for x in base) == ["official_style", "ours64"]
    assert all("rkid32_ddim10" in x.data.metrics and x.info.status == "FINISHED" for x in base)
    # same weights -> same numbers, whether they came as a p2sweep checkpoint or a bare state_dict
    assert base[0].data.metrics["rkid32_ddim5"] == pytest.approx(base[1].data.metrics["rkid32_ddim5"])
    p = parents[0]
    assert {"version.torch", "version.ray", "version.mlflow", "git_commit"} <= set(p.data.params)
    assert {"results.csv", "sweep.yaml", "metric_vs_images.png"} <= {a.path for a in c.list_artifacts(p.info.run_id)}


def test_status_best_export_and_train_the_export(faulty, tmp_path):
    st = faulty["storage"]
    r = cli("status", "faulty", "--storage", st)
    assert r.returncode == 0 and "DIVERGED" in r.stdout and "STOPPED" in r.stdout
    assert "official_style" in r.stdout and "baselines (evaluated, not trained)" in r.stdout
    out = tmp_path / "best.yaml"
    r = cli("best", "faulty", "--storage", st, "--export", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.startswith("# Best configuration of sweep 'faulty'") and "lr: 0.001" in text
    assert "ddim" in yaml.safe_load(text)["eval"]["sampling_steps"][0]
    r = cli("train", str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    r = cli("compare", "faulty", "--storage", st, "--plot", str(tmp_path / "c.png"))
    assert r.returncode == 0 and (tmp_path / "c.png").exists() and "baseline ours64" in r.stdout
    for cmd in ("status", "best", "resume"):
        r = cli(cmd, "nosuch", "--storage", st)
        assert r.returncode == 2 and "nosuch" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("change,needle", [
    ({"space": {"diffusion.p2_gama": {"grid": [0]}}}, "space.diffusion.p2_gama"),
    ({"space": {"diffusion.p2_k": {"between": [0, 1]}}}, "unknown value kind"),
    ({"space": {"diffusion.p2_k": {"grid": [-1.0]}}}, "space.diffusion.p2_k"),
    ({"metric": "fid10k_250"}, "metric"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
    ({"search": {"algorithm": "optuna"}}, "grid"),
    ({"resources": {"cpu": 0}}, "resources.cpu"),
    ({"bogus": 1}, "bogus"),
    ({"baselines": [{"name": "x", "checkpoint": "/nonexistent.pt"}]}, "baselines[0].checkpoint"),
])
def test_bad_sweep_files_exit_2_naming_the_key(tmp_path, change, needle):
    p = sweep_file(str(tmp_path), "bad", **change)
    r = cli("run", p, "--storage", str(tmp_path / "s"), "--dry-run", timeout=60)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_dry_run_prints_trials_rungs_and_work(tmp_path):
    r = cli("run", os.path.join(ROOT, "search_spaces", "smoke.yaml"), "--dry-run", "--storage", str(tmp_path))
    assert r.returncode == 0
    assert "ASHA rungs (images): [128, 384]" in r.stdout and "trials: 4" in r.stdout
    assert not os.path.exists(tmp_path / "smoke")


def run_then_kill(sweep, storage, d):
    """Start `p2sweep run` in its own session, wait for a first reported checkpoint, then SIGKILL the driver and
    every process of its session (the local Ray included), as a crashed machine would."""
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", sweep, "--storage", storage], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if any(os.path.getsize(os.path.join(d, t, "result.json")) > 0
                   for t in (os.listdir(d) if os.path.isdir(d) else [])
                   if os.path.exists(os.path.join(d, t, "result.json"))):
                break
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_then_resume(tmp_path, name, total_images, **changes):
    """A smoke-based sweep without ASHA: run, SIGKILL mid-way, `p2sweep resume`; returns (storage, experiment dir)."""
    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    base["train"]["total_images"] = total_images
    p = sweep_file(str(tmp_path), name, base=base, scheduler={"type": "none"}, **changes)
    storage = str(tmp_path / "store")
    d = os.path.join(storage, name)
    run_then_kill(p, storage, d)
    r = cli("resume", name, "--storage", storage)
    assert r.returncode == 0, r.stderr[-3000:]
    return storage, d


def test_resume_after_killing_the_driver(tmp_path):
    storage, d = kill_then_resume(tmp_path, "killme", 1152, space={"diffusion.p2_gamma": {"grid": [0.0, 1.0]}})
    from sweeps.results import _read_results, load_trials

    trials = load_trials(d, "rkid32_ddim5", 1152)
    assert len(trials) == 2 and all(t["state"] == "TERMINATED" and t["images_seen"] == 1152 for t in trials)
    for t in trials:  # nothing trained twice: reported image counts strictly increase
        seen = [x["images_seen"] for x in _read_results(os.path.join(t["dir"], "result.json"))]
        assert seen == sorted(set(seen))
    c, runs = mlflow_runs(storage, "killme")
    kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
    assert len(kids) == 2 and all(x.info.status == "FINISHED" for x in runs)
    assert len([x for x in runs if x.data.tags.get("p2sweep.role") == "sweep"]) == 1


def test_optuna_search_with_asha_persists_study_and_prunes_early_stops(tmp_path):
    import optuna

    p = sweep_file(str(tmp_path), "opt", space={"diffusion.p2_gamma": {"uniform": [0.0, 2.0]},
                                               "train.lr": {"choice": [1.0e-3, 0.3]}},
                   search={"algorithm": "optuna", "num_samples": 4, "max_concurrent": 1, "seed": 0})
    storage = str(tmp_path / "store")
    r = cli("run", p, "--storage", storage)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="opt", storage=f"sqlite:///{storage}/optuna.db")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4
    from sweeps.results import load_trials

    ray_trials = load_trials(os.path.join(storage, "opt"), "rkid32_ddim5", 384)
    stopped = sum(t["state"] == "STOPPED" for t in ray_trials)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    assert pruned == stopped  # ASHA's early stops reach Optuna as PRUNED, not as COMPLETE partial values
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 4 - stopped


def test_optuna_resume_after_kill_neither_loses_nor_duplicates_trials(tmp_path):
    import optuna

    storage, d = kill_then_resume(tmp_path, "optkill", 768, space={"diffusion.p2_gamma": {"uniform": [0.0, 2.0]}},
                                  search={"algorithm": "optuna", "num_samples": 3, "max_concurrent": 2, "seed": 0})
    from sweeps.results import load_trials

    tune_trials = load_trials(d, "rkid32_ddim5", 768)
    assert len(tune_trials) == 3 and all(t["state"] == "TERMINATED" for t in tune_trials)
    study = optuna.load_study(study_name="optkill", storage=f"sqlite:///{storage}/optuna.db")
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert optuna.trial.TrialState.RUNNING not in states
    gammas = sorted(round(t.params["diffusion.p2_gamma"], 6) for t in study.get_trials(deepcopy=False)
                    if t.state == optuna.trial.TrialState.COMPLETE)
    assert gammas == sorted(round(t["config"]["diffusion.p2_gamma"], 6) for t in tune_trials)


def test_time_budget_stops_cleanly_and_resume_finishes(tmp_path):
    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    base["train"]["total_images"] = 8192  # ~20 s per trial here: the 8 s budget ends the sweep mid-way
    base["train"]["eval_every_images"] = 2048
    p = sweep_file(str(tmp_path), "budget", base=base, space={"diffusion.p2_gamma": {"grid": [0.0, 1.0]}},
                   scheduler={"type": "none"})
    storage = str(tmp_path / "store")
    r = cli("run", p, "--storage", storage, "--time-budget", "8s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "time budget" in r.stderr and "p2sweep resume budget" in r.stdout
    states = json.load(open(os.path.join(storage, "budget", "p2sweep_trials.json")))
    assert len(states) == 2 and any(v["state"] in ("RUNNING", "PENDING", "PAUSED") for v in states.values())
    c, runs = mlflow_runs(storage, "budget")
    assert not [x for x in runs if x.info.status == "RUNNING"]
    r = cli("resume", "budget", "--storage", storage)
    assert r.returncode == 0, r.stderr[-3000:]
    states = json.load(open(os.path.join(storage, "budget", "p2sweep_trials.json")))
    assert {v["state"] for v in states.values()} == {"TERMINATED"}
    c, runs = mlflow_runs(storage, "budget")
    kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
    assert len(kids) == 2 and all(x.info.status == "FINISHED" for x in runs)


def test_mlflow_artifacts_live_in_the_storage(faulty):
    c, runs = mlflow_runs(faulty["storage"], "faulty")
    exp = c.get_experiment_by_name("faulty")
    assert exp.artifact_location.startswith(os.path.join(faulty["storage"], "mlartifacts"))
    assert not os.path.exists(os.path.join(ROOT, "mlruns"))
