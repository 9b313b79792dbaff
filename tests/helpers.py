"""What the tests share: the repository root, the environment and file of a smoke sweep, the CLI in a subprocess or
in this process, and readers of a sweep's trials and MLflow runs (fixtures live in conftest.py)."""
import json
import os
import subprocess
import sys
import types

import yaml

from p2core.config import config_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "sweeps.cli"]


def tiny_cfg(**sections):
    """A seconds-long config: synthetic 16 px images, a tiny UNet, learned sigma, evaluation off."""
    d = {
        "model": {"image_size": 16, "in_channels": 1, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                  "attention_resolutions": "8", "num_head_channels": 32},
        "diffusion": {"diffusion_steps": 100, "learn_sigma": True, "p2_gamma": 1.0, "rescale_learned_sigmas": True},
        "data": {"dataset": "synthetic", "max_images": 64},
        "train": {"total_images": 256, "batch_size": 16, "lr": 1e-3, "ema_rate": 0.9, "log_every_images": 32,
                  "checkpoint_every_images": 128, "num_threads": 1, "grid_samples": 0, "seed": 0,
                  "bf16": False},  # a toy UNet is overhead-bound: bf16 autocast costs more than it saves
        "eval": {"enabled": False, "num_samples": 16, "sampling_steps": ["ddim5"], "extractor": "random",
                 "ref_samples": 32, "batch_size": 16},
    }
    for sec, vals in sections.items():
        if isinstance(vals, dict):
            d.setdefault(sec, {}).update(vals)
        else:
            d[sec] = vals
    return config_from_dict(d)


def crash_once_at(monkeypatch, images):
    """Make the training step that would reach `images` raise once (a killed process, for the resume tests)."""
    from p2core.trainer import Trainer

    real, state = Trainer.train_step, {"crashed": False}

    def step(self, x):
        if not state["crashed"] and self.images_seen + x.shape[0] >= images:
            state["crashed"] = True
            raise RuntimeError(f"injected crash at {self.images_seen} images")
        return real(self, x)

    monkeypatch.setattr(Trainer, "train_step", step)


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=120)


def fake_trial(tid, config, status="RUNNING"):
    """What Tune's scheduler and searcher hooks read of a trial."""
    return types.SimpleNamespace(trial_id=tid, config=config, status=status)


HERE = os.path.dirname(os.path.abspath(__file__))  # tests/
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), RAY_USAGE_STATS_ENABLED="0",
           MLFLOW_DISABLE_TELEMETRY="true", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TQDM_DISABLE="1")
M = "rkid32_ddim5"


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


def cli(*args, timeout=400, faults=None, env=None, session=False):
    """The p2sweep CLI in a subprocess, through tests/faults.py when faults are given."""
    e = dict(ENV, **(env or {}))
    if faults is not None:
        e["P2SWEEP_FAULTS"] = json.dumps(faults)
        cmd = [sys.executable, os.path.join(HERE, "faults.py"), *args]
    else:
        cmd = [sys.executable, "-m", "sweeps.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=e, timeout=timeout,
                          start_new_session=session)


def sweep(ray_session, *args, faults=None):
    """`p2sweep ARGS` in this process, on the module's Ray session; returns the exit status."""
    from sweeps.cli import main

    with open(ray_session, "w") as f:
        json.dump(faults or {}, f)
    try:
        return main(list(args))
    finally:
        with open(ray_session, "w") as f:
            f.write("{}")


def mlflow_runs(storage, name):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = c.get_experiment_by_name(name)
    return c, c.search_runs([exp.experiment_id], max_results=1000)


def trials_of(storage, name):
    from sweeps.results.trials import load_trials

    return load_trials(os.path.join(storage, name), M)


def smoke_raw(**changes):
    with open(os.path.join(ROOT, "search_spaces", "smoke.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(changes)
    return d


def write_trial(d, tid, group, seed, reports, state):
    """A trial folder with result.json rows (images, {metric: value}) and its entry for p2sweep_trials.json."""
    tdir = os.path.join(d, f"trial_{tid}")
    os.makedirs(tdir)
    cfg = {"train.lr": 0.001 * (group + 1), "p2sweep_group": group, "train.seed": seed}
    with open(os.path.join(tdir, "result.json"), "w") as f:
        for i, (imgs, vals) in enumerate(reports):
            f.write(json.dumps({"trial_id": tid, "config": cfg, "images_seen": imgs, "final": int(imgs == 384),
                                "timestamp": i, **vals}) + "\n")
    return tid, {"state": state, "diverged": False, "images_seen": reports[-1][0], "config": cfg,
                 "dir": f"trial_{tid}"}
