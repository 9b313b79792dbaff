"""A sweep whose storage is an S3 bucket (moto on 127.0.0.1) and whose tracking is an MLflow server with its artifacts
in the same bucket: run, SIGKILL of the driver's whole session mid-sweep, resume to the end; then `status`, `best
--export`, `compare` and `report` read the bucket and the exported config trains unchanged. Runs in `make
test-cluster` (a few minutes)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from servers import BUCKET, SECRET, stop  # noqa: E402
from helpers import ENV, M, ROOT, sweep_file  # noqa: E402

pytestmark = pytest.mark.cluster


def cli_env(s3, mlflow_server, cache):
    return dict(ENV, **s3.env, MLFLOW_TRACKING_URI=mlflow_server.uri, P2SWEEP_CACHE=str(cache))


def run_cli(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def wait_for_report(s3, prefix: str, seconds: float, proc) -> None:
    """Until one trial has a report (and so a checkpoint) in the bucket."""
    end = time.time() + seconds
    while time.time() < end:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        for k in s3.keys(prefix):
            if k.endswith("/result.json") and s3.read(k).strip():
                return
        time.sleep(1)
    raise AssertionError("no trial reported in time")


def test_s3_sweep_with_tracking_server_survives_a_driver_kill(s3, mlflow_server, s3_env, tmp_path):
    from mlflow.tracking import MlflowClient

    from sweeps.record.meta import load_meta
    from sweeps.results.trials import load_trials

    name, storage = "s3kill", f"s3://{BUCKET}/sweeps"
    p = sweep_file(str(tmp_path), name, space={"diffusion.p2_gamma": {"grid": [0.0, 1.0]}})
    env = cli_env(s3, mlflow_server, tmp_path / "cache_a")
    with open(tmp_path / "run.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", p, "--storage", storage], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            wait_for_report(s3, f"sweeps/{name}/", 300, proc)
        finally:
            stop(proc, signal.SIGKILL)  # the driver, the local Ray it started and Ray's workers
    run_err = open(tmp_path / "run.err").read()
    assert "reference statistics: computed" in run_err, run_err[-3000:]
    # another machine resumes: a fresh node cache, so the statistics come out of the bucket, not off this disk
    env = cli_env(s3, mlflow_server, tmp_path / "cache_b")
    r = run_cli(["resume", name, "--storage", storage], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"reference statistics: found in s3://{BUCKET}/sweeps/cache/refstats/" in r.stderr, r.stderr[-3000:]
    assert os.listdir(tmp_path / "cache_b" / "refstats")  # copied from the bucket

    trials = load_trials(f"{storage}/{name}", M)
    assert len(trials) == 2 and all(t.state in ("TERMINATED", "STOPPED") for t in trials), [t.state for t in trials]
    # the reference statistics were computed once for the sweep (the task of the first run), by no trial
    refs = {json.loads(line).get("reference") for t in trials
            for line in s3.read(f"sweeps/{name}/{os.path.basename(t.dir)}/result.json").decode().splitlines()}
    assert refs <= {"cache", "storage"}, refs
    keys = s3.keys(f"sweeps/{name}/")
    for t in trials:  # the trial's own files reached the bucket, one continuous metrics.jsonl across the kill
        tdir = f"sweeps/{name}/{os.path.basename(t.dir)}"
        recs = [json.loads(x) for x in s3.read(f"{tdir}/p2/metrics.jsonl").decode().splitlines()]
        seen = [x["images_seen"] for x in recs if x.get("kind") == "train"]
        assert seen == list(range(64, t.images_seen + 1, 64)), (t.trial_id, seen)
        # grids are drawn at the end of training (a trial that ASHA stopped has none)
        assert any(k.startswith(f"{tdir}/p2/samples/grid_") for k in keys) == (t.state == "TERMINATED")
        assert any(k.startswith(f"{tdir}/checkpoint_") for k in keys)

    # MLflow: one run per trial, none left RUNNING, their artifacts in the bucket (through the server)
    c = MlflowClient(mlflow_server.uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
    parent = next(x for x in runs if x.data.tags.get("p2sweep.role") == "sweep")
    assert parent.data.params["reference.computed"] == "True"  # by the first run's task; resume found it
    assert len(kids) == 2 and not [x for x in runs if x.info.status == "RUNNING"]
    for k in kids:
        assert "metrics.jsonl" in [a.path for a in c.list_artifacts(k.info.run_id)]
    assert [k for k in s3.keys("mlartifacts/") if k.endswith("/metrics.jsonl")]
    # no secret anywhere: MLflow params, p2sweep.json, the logged sweep file, any object in the bucket
    assert all(SECRET not in v for x in runs for v in x.data.params.values())
    for k in s3.keys(""):
        assert SECRET.encode() not in s3.read(k), k
    assert load_meta(name, storage).paths.storage == storage

    # the read-only commands and the exported config
    for cmd in (["status", name], ["compare", name, "--plot", str(tmp_path / "compare.png")], ["best", name, "--export", str(tmp_path / "best.yaml")],
                ["report", name]):
        r = run_cli([*cmd, "--storage", storage], env)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    assert any(k.endswith(f"sweeps/{name}/report/report.html") for k in s3.keys(f"sweeps/{name}/report/"))
    r = run_cli(["ui", name, "--storage", storage], env)  # a tracking server is its own UI: the address, no server
    assert r.returncode == 0 and f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}/runs" in r.stdout, r.stdout
    r = run_cli(["train", str(tmp_path / "best.yaml"), "--out", str(tmp_path / "retrain"), "--no-progress"], env)
    assert r.returncode == 0, r.stderr[-2000:]
