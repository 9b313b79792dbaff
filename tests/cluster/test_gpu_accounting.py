"""GPU resource accounting, tested without a GPU: Ray accepts GPUs declared on a CPU node (`ray start --num-gpus`,
`ray.init(num_gpus=)`) and places and accounts for them as for real ones, setting CUDA_VISIBLE_DEVICES for what it
places. Checked here: `gpu: 0.5` packs two trials per GPU and never more; the reference task takes one trial's
share; each trial sees the device id Ray gave it and, torch seeing no CUDA device, trains on CPU and says so; a
trial that fits no node of an attached cluster is a warning; two local sweeps split by CUDA_VISIBLE_DEVICES each
see their own GPU. Runs in `make test-cluster`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from servers import RayNode, stop  # noqa: E402
from helpers import ENV, ROOT, sweep_file  # noqa: E402

pytestmark = pytest.mark.cluster


def _base(total=256):
    import yaml

    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    base["train"].update(total_images=total, eval_every_images=128)
    return base


def _reports(storage, name) -> dict:
    """{trial dir: [result rows]} of a path storage."""
    d = os.path.join(storage, name)
    out = {}
    for t in sorted(os.listdir(d)):
        rj = os.path.join(d, t, "result.json")
        if os.path.exists(rj):
            out[t] = [json.loads(x) for x in open(rj) if x.strip()]
    return out


def _most_at_once(spans: list) -> int:
    """The largest number of [start, end] intervals that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_half_a_gpu_packs_two_trials_per_declared_gpu_and_the_reference_takes_a_trials_share(tmp_path):
    env = dict(ENV, P2SWEEP_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
    head = RayNode(str(tmp_path), dict(env, PYTHONPATH=ROOT), num_cpus=3, num_gpus=1)  # 3 CPUs: only the GPU limits
    try:
        storage = str(tmp_path / "store")
        p = sweep_file(str(tmp_path), "gpus", base=_base(), space={"diffusion.p2_gamma": {"grid": [0.0, 0.5, 1.0]}},
                       scheduler={"type": "none"}, resources={"cpu": 1, "gpu": 0.5})
        r = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", p, "--storage", storage, "--address",
                            head.address], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "reference statistics: a Ray task with {'num_cpus': 1.0, 'num_gpus': 0.5}" in r.stderr, r.stderr[-3000:]
        assert "on GPU 0 in" in r.stderr  # the task saw the GPU Ray gave it
        assert "was given GPU 0 by Ray (CUDA_VISIBLE_DEVICES=0), but torch sees no CUDA device: training on CPU" in \
            r.stderr + r.stdout
        reps = _reports(storage, "gpus")
        assert len(reps) == 3
        for rows in reps.values():
            assert {x["gpus"] for x in rows} == {"0"} and {x["device"] for x in rows} == {"cpu"}, rows[-1]
            assert rows[-1]["final"] == 1
        # each trial's life, from the start of its function (Tune's time_total_s counts from there, setup included)
        # to its last report: two at once (packed), never three on one GPU. (From its first report on, a trial
        # lives about 3 s: two packed trials whose setups took different times on a busy machine did not overlap.)
        spans = [(rows[-1]["reported_at"] - rows[-1]["time_total_s"], rows[-1]["reported_at"])
                 for rows in reps.values()]
        assert _most_at_once(spans) == 2, spans

        # a trial no node can hold, attached: a warning at start (an autoscaler may still add a node that fits);
        # the driver then waits, as Ray does, so the test stops it
        p = sweep_file(str(tmp_path), "toobig", base=_base(), space={"diffusion.p2_gamma": {"grid": [0.0]}},
                       scheduler={"type": "none"}, resources={"cpu": 8, "gpu": 0.5})
        errf = tmp_path / "toobig.err"
        with open(errf, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", p, "--storage", storage, "--address",
                                     head.address], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            try:
                want = ("warning: resources.cpu 8: no Ray node has 8 CPU(s) and 0.5 GPU for one trial; Ray sees "
                        "1 node(s): 3 CPU + 1 GPU")
                end = time.time() + 60
                while want not in errf.read_text():
                    assert proc.poll() is None and time.time() < end, errf.read_text()[-3000:]
                    time.sleep(0.5)
            finally:
                stop(proc, signal.SIGKILL)  # the driver, the local Ray it started and Ray's workers
    finally:
        head.stop()


def test_two_local_sweeps_split_by_cuda_visible_devices_each_see_their_own_gpu(tmp_path):
    procs = {}
    for gpu in ("0", "1"):
        storage = str(tmp_path / f"store{gpu}")
        p = sweep_file(str(tmp_path), f"local{gpu}", base=_base(128), space={"diffusion.p2_gamma": {"grid": [1.0]}},
                       scheduler={"type": "none"}, resources={"cpu": 1, "gpu": 1})
        env = dict(ENV, CUDA_VISIBLE_DEVICES=gpu, P2SWEEP_CACHE=str(tmp_path / f"cache{gpu}"))
        procs[gpu] = (storage, subprocess.Popen([sys.executable, os.path.join(HERE, "declared_gpus.py"), "run", p,
                                                 "--storage", storage], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True))
    for gpu, (storage, proc) in procs.items():
        out, err = proc.communicate(timeout=500)
        assert proc.returncode == 0, err[-3000:]
        (rows,) = _reports(storage, f"local{gpu}").values()
        assert {x["gpus"] for x in rows} == {gpu}, rows[-1]
