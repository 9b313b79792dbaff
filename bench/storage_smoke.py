"""The smoke sweep (search_spaces/smoke.yaml, 4 trials) with its storage on local disk and in an S3 bucket, run one
after the other on this machine, each a fresh `p2sweep run` process with its own local Ray:

- local: `--storage DIR`, MLflow in the storage's SQLite file (the default);
- local + server: `--storage DIR`, MLflow on a tracking server with its artifacts in the bucket;
- s3 + server: `--storage s3://bucket/prefix`, the same tracking server (the cluster set-up).

The S3 API is moto_server and the tracking server `mlflow server`, both on 127.0.0.1, started and stopped here by
PID. For each: wall time of the whole `p2sweep run`, and the driver's time before the first trial started (from the
process start to the earliest trial run's start in MLflow), with the reference-statistics task's own seconds (the
parent run's `reference.task_seconds`). Prints one JSON line.

  python bench/storage_smoke.py [--repeat 1]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "cluster"))

from servers import BUCKET, S3, MLflowServer  # noqa: E402  (the test fixtures' own servers)


def one(kind: str, tmp: str, s3: S3, server: MLflowServer, i: int) -> dict:
    from mlflow.tracking import MlflowClient

    name = f"smoke{kind.replace('+', '').replace(' ', '')}{i}"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1",
               P2SWEEP_CACHE=os.path.join(tmp, f"cache-{name}"), PYTHONPATH=ROOT)
    env.pop("MLFLOW_TRACKING_URI", None)
    if kind == "local":
        storage, uri = os.path.join(tmp, "local"), f"sqlite:///{os.path.join(tmp, 'local', 'mlflow.db')}"
    else:
        env.update(s3.env, MLFLOW_TRACKING_URI=server.uri)
        storage = f"s3://{BUCKET}/bench" if kind.startswith("s3") else os.path.join(tmp, "local-server")
        uri = server.uri
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", os.path.join(ROOT, "search_spaces", "smoke.yaml"),
                        "--name", name, "--storage", storage], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{kind}: p2sweep run failed\n{r.stderr[-3000:]}")
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name(name).experiment_id], max_results=100)
    first = min(x.info.start_time for x in runs if x.data.tags.get("p2sweep.role") == "trial") / 1000
    parent = next(x for x in runs if x.data.tags.get("p2sweep.role") == "sweep")
    return {"storage": kind, "wall_s": round(wall, 1), "driver_before_first_trial_s": round(first - t0, 1),
            "reference_task_s": float(parent.data.params["reference.task_seconds"]),
            "reference_computed": parent.data.params["reference.computed"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="p2bench-")
    s3 = S3(tmp)
    server = None
    try:
        server = MLflowServer(tmp, s3)
        rows = [one(kind, tmp, s3, server, i) for i in range(args.repeat)
                for kind in ("local", "local + server", "s3 + server")]
    finally:
        if server is not None:
            server.stop()
        s3.stop()
    print(json.dumps({"bench": "storage_smoke", "cpus": os.cpu_count(), "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
