import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Nothing in the tests may call out: Ray usage stats and MLflow telemetry off, Ray on loopback.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One local Ray for the in-process sweeps of each test module that asks for it (each `p2sweep` subprocess would
    pay Python imports, a Ray start and a stop: most of a smoke sweep's time). Started through p2sweep's own local start-up, with the
    test-side fault hook in every worker; faults come from a file each test rewrites."""
    import ray

    import faults
    from helpers import ENV
    from sweeps.tune import ray_env

    ffile = str(tmp_path_factory.mktemp("faults") / "faults.json")
    with open(ffile, "w") as f:
        f.write("{}")
    saved = {k: os.environ.get(k) for k in ("P2SWEEP_FAULTS_FILE", "PYTHONPATH")}
    os.environ.update(P2SWEEP_FAULTS_FILE=ffile, PYTHONPATH=ENV["PYTHONPATH"])
    real = ray.init
    ray.init = faults.with_worker_faults(real)
    try:
        ray_env.init_ray(None)
    finally:
        ray.init = real
    yield ffile
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
