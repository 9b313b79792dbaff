"""The MLflow view `p2sweep ui` opens, in a real MLflow server (127.0.0.1, started and stopped by PID) and Debian's
headless Chromium: the trials listed flat, the swept parameters, the seed and the sweep metric at every sampling spec
as columns, sorted by the metric. Skipped (saying why) where chromium is not installed. Runs in `make test-cluster`."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.cluster
METRICS = ["kid100_ddim10", "kid100_ddim25"]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import free_port, wait_http  # noqa: E402


@pytest.fixture
def server(tmp_path):
    """A sweep-shaped MLflow store (a parent run, 4 trial child runs as p2sweep logs them) served on 127.0.0.1."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from sweeps.tracking.view import set_compare_view

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("viewtest", artifact_location=str(tmp_path / "art"))
    parent = c.create_run(exp, run_name="viewtest (sweep)", tags={"p2sweep.role": "sweep"}).info.run_id
    for g, gamma in enumerate((0.0, 1.0)):
        for seed in (0, 1):
            rid = c.create_run(exp, run_name=f"g{g}s{seed}-trial", tags={
                "mlflow.parentRunId": parent, "p2sweep.role": "trial", "p2sweep.replicate": f"{g}:{seed}"}).info.run_id
            c.log_batch(rid, params=[Param("diffusion.p2_gamma", str(gamma)), Param("train.seed", str(seed)),
                                     Param("train.lr", "0.0005")],
                        metrics=[Metric(m, 0.3 - 0.1 * g + 0.01 * seed + 0.001 * i, 0, 100)
                                 for i, m in enumerate(METRICS)])
            c.set_terminated(rid)
    path = set_compare_view(c, exp, METRICS[0], ["diffusion.p2_gamma"], METRICS)
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    p = subprocess.Popen([os.path.join(BIN, "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                          "--port", str(port), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", p, str(tmp_path / "server.log"))
        yield f"http://127.0.0.1:{port}/{path}", c, exp
    finally:
        os.killpg(p.pid, signal.SIGTERM)  # its own session: the server and its workers, no one else's
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_view_state_tag_is_the_uis_saved_view_envelope(server):
    _, c, exp = server
    tag = c.get_experiment(exp).tags["mlflow.sharedViewState.p2sweep"]
    env = json.loads(tag)
    assert {"name", "createdAt", "state"} <= set(env)
    state = json.loads(env["state"])
    assert state["searchFilter"] == "tags.`p2sweep.role` = 'trial'"
    assert state["orderByKey"] == "metrics.`kid100_ddim10`" and state["orderByAsc"] is True
    assert state["selectedColumns"] == ["params.`diffusion.p2_gamma`", "params.`train.seed`",
                                        "metrics.`kid100_ddim10`", "metrics.`kid100_ddim25`"]


def test_ui_address_opens_the_trials_with_the_swept_columns_in_chromium(server, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    if exe is None:
        pytest.skip("chromium is not installed: `make test` installs Debian's chromium with apt when run as root")
    url, _, _ = server
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1000", "--virtual-time-budget=30000"]
    dom = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    shot = tmp_path / "view.png"
    subprocess.run(args + [f"--screenshot={shot}", url], capture_output=True, timeout=180)
    # the four trials, flat (not folded under the parent run), best first; the parent run is filtered out
    names = ["g1s0-trial", "g1s1-trial", "g0s0-trial", "g0s1-trial"]
    pos = [dom.find(n) for n in names]
    assert all(p >= 0 for p in pos), dom[-3000:]
    assert pos == sorted(pos), "not sorted by the metric, best first"
    assert "viewtest (sweep)" not in dom
    for col in ("diffusion.p2_gamma", "train.seed", "kid100_ddim10", "kid100_ddim25"):
        assert col in dom, f"column {col} not shown"
    assert "train.lr" not in dom  # only the swept parameters and the seed
    assert shot.exists() and shot.stat().st_size > 10_000
