"""Attaching to a Ray head that uses token authentication (case 15 of "sweeps, part 2"): a real `ray start --head`
on 127.0.0.1 with its own HOME (so its ~/.ray/auth_token is the test's), started and stopped by PID. The driver's
environment has no RAY_AUTH_MODE: p2sweep must set it before Ray is imported. Runs in `make test-cluster`."""
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.cluster
sys.path.insert(0, HERE)
from servers import free_port, stop, wait_port  # noqa: E402


@pytest.fixture
def token_head(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    port = free_port()
    short_tmp = tempfile.mkdtemp(prefix="p2rt", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    head = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={short_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_port(port, 60), "the Ray head did not come up"
        yield {"port": port, "env": env, "home": home}
    finally:
        stop(head)  # the head and the processes it started, nothing else
        shutil.rmtree(short_tmp, ignore_errors=True)


def test_run_attaches_to_a_token_auth_head_without_ray_auth_mode(token_head, tmp_path):
    with open(os.path.join(ROOT, "search_spaces", "smoke.yaml")) as f:
        d = yaml.safe_load(f)
    d["space"] = {"diffusion.p2_gamma": {"grid": [0.0]}}
    d["scheduler"] = {"type": "none"}
    p = tmp_path / "tok.yaml"
    p.write_text(yaml.safe_dump(d))
    env = dict(token_head["env"], PYTHONPATH=ROOT, MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(p), "--name", "tok", "--storage",
                        str(tmp_path / "st"), "--address", f"127.0.0.1:{token_head['port']}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TERMINATED" in r.stdout
