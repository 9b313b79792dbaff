"""An Optuna + ASHA sweep interrupted (Ctrl-C once its first trial reported), its storage folder copied elsewhere, the copy resumed to
the end: the copy's own MLflow and Optuna databases, results and trial folders are used (Ray's tuner.pkl and
search_gen_state still name the original's paths), MLflow's artifact locations follow the copy, and the original
folder is left exactly as it was. Runs in `make test-cluster`."""
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from helpers import ENV, ROOT, cli, mlflow_runs, sweep_file, trials_of  # noqa: E402

pytestmark = pytest.mark.cluster


def tree(root: str) -> dict:
    """{relative path: sha256} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def wait_for_first_report(exp_dir: str, proc, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        if any(os.path.getsize(f) for f in glob.glob(os.path.join(exp_dir, "*", "result.json"))):
            return
        time.sleep(0.5)
    raise AssertionError("no trial reported in time")


def test_a_copied_storage_resumes_on_its_own(tmp_path):
    import yaml

    base = yaml.safe_load(open(os.path.join(os.path.dirname(os.path.dirname(HERE)), "search_spaces",
                                            "smoke.yaml")))["base"]
    base["train"].update(total_images=768)
    # Optuna with ASHA, one trial at a time: trials are created after the resume (their folders, the searcher's
    # study and ASHA's rebuild must all be the copy's)
    p = sweep_file(str(tmp_path), "moving", base=base, space={"diffusion.p2_gamma": {"uniform": [0.0, 2.0]}},
                   search={"algorithm": "optuna", "num_samples": 3, "max_concurrent": 1, "seed": 0},
                   scheduler={"type": "asha", "grace_period_images": 256, "reduction_factor": 2}, max_failures=0)
    orig = str(tmp_path / "orig")
    # interrupted on an event, not after a time (a --time-budget raced the whole sweep on a faster machine)
    with open(tmp_path / "run.out", "w") as out, open(tmp_path / "run.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", p, "--storage", orig], cwd=ROOT,
                                env=dict(ENV, TUNE_GLOBAL_CHECKPOINT_S="1"), stdout=out, stderr=err)
        try:
            wait_for_first_report(os.path.join(orig, "moving"), proc, 300)
            proc.send_signal(signal.SIGINT)  # as Ctrl-C, or --time-budget, does
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = open(tmp_path / "run.out").read(), open(tmp_path / "run.err").read()
    assert rc == 130 and "p2sweep resume moving" in stdout, (rc, stderr[-3000:])
    assert [t for t in trials_of(orig, "moving") if t.state in ("RUNNING", "PENDING", "PAUSED")]  # interrupted
    copy = str(tmp_path / "copy")
    shutil.copytree(orig, copy)
    before = tree(orig)
    r = cli("resume", "moving", "--storage", copy)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(orig) == before  # nothing written to the original: not its MLflow, results or Tune state
    trials = trials_of(copy, "moving")
    assert len(trials) == 3 and all(t.state in ("TERMINATED", "STOPPED") for t in trials), [t.state for t in trials]
    assert all(t.dir.startswith(copy) for t in trials)
    import optuna

    from sweeps.record.meta import load_meta

    study = optuna.load_study(study_name=load_meta("moving", copy).study_name, storage=f"sqlite:///{copy}/optuna.db")
    assert len(study.get_trials()) == 3 and all(t.state != optuna.trial.TrialState.RUNNING for t in study.get_trials())
    c, runs = mlflow_runs(copy, "moving")
    kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
    assert len(kids) == 3 and not [x for x in runs if x.info.status == "RUNNING"]
    for k in kids:
        assert k.info.artifact_uri.startswith(copy)
        assert "metrics.jsonl" in [a.path for a in c.list_artifacts(k.info.run_id)]
        assert int(k.data.tags["p2sweep.images_seen"]) in (256, 512, 768)
