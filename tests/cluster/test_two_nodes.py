"""A two-node Ray cluster on this machine (a head and a second node, each `ray start --block` on 127.0.0.1 with its
own --temp-dir and its own node cache, started and stopped by PID) with the sweep's storage in an S3 bucket (moto)
and MLflow on a tracking server: the driver attaches with --address; one trial runs on each node; the second node
is SIGKILLed (its whole process group) after its trial reported; that trial continues from its checkpoint in the
bucket on the head, with one MLflow run, and the sweep finishes. Runs in `make test-cluster`."""
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from servers import BUCKET, RayNode, stop  # noqa: E402
from helpers import ENV, M, ROOT, sweep_file  # noqa: E402

pytestmark = pytest.mark.cluster


def node_env(s3, cache, home) -> dict:
    """A Ray node's environment: credentials and endpoint of its own (never shipped by the driver), its own cache.
    The nodes run the `ray` CLI through ray_loopback.py, which keeps every Ray address on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_ADDRESS", "P2SWEEP_", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))}
    # token authentication with the cluster's own token (HOME/.ray/auth_token), as a real cluster would have it
    return dict(env, **s3.env, P2SWEEP_CACHE=str(cache), PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0",
                MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1", RAY_AUTH_MODE="token", HOME=str(home))


def alive_nodes(address: str, env: dict) -> int:
    r = subprocess.run([sys.executable, os.path.join(HERE, "ray_loopback.py"), "status", f"--address={address}"],
                       capture_output=True, text=True, env=env, timeout=60)
    active = r.stdout.split("Active:")[1].split("Pending:")[0] if "Active:" in r.stdout else ""
    return len(re.findall(r"\bnode_", active))


def wait_for_nodes(address: str, env: dict, n: int = 2, seconds: float = 90) -> None:
    end = time.time() + seconds
    while alive_nodes(address, env) < n:
        assert time.time() < end, f"fewer than {n} Ray nodes joined within {seconds} s"
        time.sleep(2)


def reports_from(s3, prefix: str) -> dict:
    """{trial dir: [node of each report]} from the result.json files in the bucket."""
    out = {}
    for k in s3.keys(prefix):
        if k.endswith("/result.json"):
            out[k.split("/")[-2]] = [json.loads(x).get("node") for x in s3.read(k).decode().splitlines() if x]
    return out


def test_trials_on_two_nodes_and_a_lost_node(s3, mlflow_server, s3_env, tmp_path):
    from mlflow.tracking import MlflowClient

    from procs import session_pids
    from sweeps.results.trials import load_trials

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    head = RayNode(str(tmp_path), node_env(s3, tmp_path / "cache_head", home), num_cpus=1)
    node_b = None
    try:
        node_b = RayNode(str(tmp_path), node_env(s3, tmp_path / "cache_b", home), head_address=head.address,
                         num_cpus=1, name="node_b", resources='{"node_b": 1}')
        wait_for_nodes(head.address, node_env(s3, tmp_path, home))
        name, storage = "twonode", f"s3://{BUCKET}/cluster"
        base = __import__("yaml").safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
        base["train"].update(total_images=512, eval_every_images=128,
                             ema={"type": "power", "sigma_rels": [0.05, 0.10], "snapshot_every_images": 64})
        base["eval"]["ema_sigma_rels"] = [0.07]  # reconstructed at every evaluation, also after the move
        p = sweep_file(str(tmp_path), name, base=base, space={"diffusion.p2_gamma": {"grid": [0.0, 1.0]}},
                       scheduler={"type": "none"}, max_failures=2)
        # the driver: this machine's loopback-only Ray settings (test_sweep.ENV), the cluster's token (its HOME; no
        # RAY_AUTH_MODE: p2sweep sets it when it finds the token)
        env = dict(ENV, **s3.env, MLFLOW_TRACKING_URI=mlflow_server.uri, P2SWEEP_CACHE=str(tmp_path / "cache_drv"),
                   HOME=str(home))
        env.pop("RAY_AUTH_MODE", None)
        with open(tmp_path / "run.err", "w") as err, open(tmp_path / "run.out", "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", p, "--storage", storage, "--address",
                                     head.address], cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
            try:
                end = time.time() + 400
                while not any("node_b" in nodes for nodes in reports_from(s3, f"cluster/{name}/").values()):
                    assert proc.poll() is None, open(tmp_path / "run.err").read()[-3000:]
                    assert time.time() < end, "no trial reported from node_b"
                    time.sleep(1)
                node_b.stop(signal.SIGKILL)  # node loss: the raylet, its workers and its trial, at once
                # (Ray's workers have process groups of their own: a trial left running would go on reporting)
                assert not session_pids(node_b.proc.pid)
                rc = proc.wait(500)
            finally:
                if proc.poll() is None:
                    stop(proc, signal.SIGKILL)
        err = open(tmp_path / "run.err").read()
        assert rc == 0, err[-4000:]
        trials = load_trials(f"{storage}/{name}", M)
        assert len(trials) == 2 and all(t.state == "TERMINATED" for t in trials), [t.state for t in trials]
        nodes = reports_from(s3, f"cluster/{name}/")
        moved = [d for d, ns in nodes.items() if "node_b" in ns]
        assert len(moved) == 1 and nodes[moved[0]][-1] != "node_b", nodes  # finished on the head
        refs = {json.loads(x).get("reference") for t in trials
                for x in s3.read(f"cluster/{name}/{os.path.basename(t.dir)}/result.json").decode().splitlines()}
        assert "storage" in refs and "computed by the trial" not in refs, refs
        assert err.count("reference statistics: computed") == 1
        for t in trials:  # one continuous metrics.jsonl, also for the trial that lost its node
            recs = s3.read(f"cluster/{name}/{os.path.basename(t.dir)}/p2/metrics.jsonl").decode().splitlines()
            seen = [json.loads(x)["images_seen"] for x in recs if json.loads(x).get("kind") == "train"]
            assert seen == list(range(64, 513, 64)), (t.trial_id, seen)
            # every power-EMA snapshot in the bucket, each uploaded whole when taken, whichever node took it; the
            # moved trial found those node_b took (else its resume names the missing ones on stderr)
            folder = f"cluster/{name}/{os.path.basename(t.dir)}/p2/ema_snapshots/"
            snaps = sorted(k.rsplit("/", 1)[1] for k in s3.keys(folder) if not k.endswith("/"))  # not dir markers
            assert snaps == [f"snap_{n:012d}.pt" for n in range(64, 513, 64)], (t.trial_id, snaps)
            evals = [json.loads(x) for x in recs if json.loads(x).get("kind") == "eval"]
            assert [e["images_seen"] for e in evals] == [128, 256, 384, 512]
            assert all(f"{M}_ema0.07" in e for e in evals), evals[-1]
        assert "resumed without" not in err and "resumed without" not in open(tmp_path / "run.out").read()
        c = MlflowClient(mlflow_server.uri)
        runs = c.search_runs([c.get_experiment_by_name(name).experiment_id], max_results=100)
        kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
        parent = next(x for x in runs if x.data.tags.get("p2sweep.role") == "sweep")
        assert parent.data.params["reference.computed"] == "True"  # the one computation: the driver's task
        assert len(kids) == 2 and not [x for x in runs if x.info.status == "RUNNING"]
        for k in kids:
            assert "metrics.jsonl" in [a.path for a in c.list_artifacts(k.info.run_id)]
        r = subprocess.run([sys.executable, "-m", "sweeps.cli", "status", name, "--storage", storage],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert re.search(r"node_b > [0-9a-f]{8}", r.stdout), r.stdout  # where each trial ran
    finally:
        if node_b is not None:
            node_b.stop()
        head.stop()
