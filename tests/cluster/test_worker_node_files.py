"""The README's cluster layout: a head node with no CPUs for trials (the driver's machine) and a worker node that runs
every trial to its end. Each trial's own files (p2/metrics.jsonl, its sample grids, config.yaml) must reach the
sweep's bucket from the worker and be logged to its MLflow run. (Ray uploads a trial's *working directory* from its
node; a function trainable's get_trial_dir() is the driver's staging folder, which nothing uploads from a worker.)
Runs in `make test-cluster`."""
import json
import os
import secrets
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from servers import BUCKET, RayNode  # noqa: E402
from helpers import ENV, M, ROOT, sweep_file  # noqa: E402
from test_two_nodes import node_env, reports_from, wait_for_nodes  # noqa: E402

pytestmark = pytest.mark.cluster


def test_trial_that_runs_on_a_worker_node_to_the_end_has_its_files_in_the_bucket_and_mlflow(
        s3, mlflow_server, s3_env, tmp_path):
    from mlflow.tracking import MlflowClient

    from sweeps.results.trials import load_trials

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    head = RayNode(str(tmp_path), node_env(s3, tmp_path / "cache_head", home), num_cpus=0)  # no trial fits here
    worker = None
    try:
        worker = RayNode(str(tmp_path), node_env(s3, tmp_path / "cache_w", home), head_address=head.address,
                         num_cpus=1, name="worker")
        wait_for_nodes(head.address, node_env(s3, tmp_path, home))
        name, storage = "onworker", f"s3://{BUCKET}/workerfiles"
        base = __import__("yaml").safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
        base["train"].update(total_images=256, eval_every_images=128, sample_every_images=128)
        p = sweep_file(str(tmp_path), name, base=base, space={"diffusion.p2_gamma": {"grid": [1.0]}},
                       scheduler={"type": "none"})
        env = dict(ENV, **s3.env, MLFLOW_TRACKING_URI=mlflow_server.uri, P2SWEEP_CACHE=str(tmp_path / "cache_drv"),
                   HOME=str(home))
        env.pop("RAY_AUTH_MODE", None)
        r = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", p, "--storage", storage, "--address",
                            head.address], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
        assert r.returncode == 0, r.stderr[-4000:]
        trials = load_trials(f"{storage}/{name}", M)
        assert len(trials) == 1 and trials[0].state == "TERMINATED", [t.state for t in trials]
        nodes = reports_from(s3, f"workerfiles/{name}/")
        assert nodes and all(set(ns) == {"worker"} for ns in nodes.values()), nodes  # ran there to the end
        tdir = os.path.basename(trials[0].dir)
        keys = [k.split(f"workerfiles/{name}/{tdir}/", 1)[1] for k in s3.keys(f"workerfiles/{name}/{tdir}/")]
        assert "p2/config.yaml" in keys and "p2/metrics.jsonl" in keys, keys
        grids = sorted(k for k in keys if k.startswith("p2/samples/") and k.endswith(".png"))
        assert grids, keys
        recs = [json.loads(x) for x in
                s3.read(f"workerfiles/{name}/{tdir}/p2/metrics.jsonl").decode().splitlines() if x]
        assert [x["images_seen"] for x in recs if x.get("kind") == "train"] == list(range(64, 257, 64))
        c = MlflowClient(mlflow_server.uri)
        runs = c.search_runs([c.get_experiment_by_name(name).experiment_id], max_results=100)
        kid = next(x for x in runs if x.data.tags.get("p2sweep.role") == "trial")
        arts = {a.path for a in c.list_artifacts(kid.info.run_id)}
        assert {"config.yaml", "metrics.jsonl", "samples"} <= arts, arts
        logged = {os.path.basename(a.path) for a in c.list_artifacts(kid.info.run_id, "samples")}
        assert {os.path.basename(g) for g in grids} <= logged, (grids, logged)
    finally:
        if worker is not None:
            worker.stop()
        head.stop()
