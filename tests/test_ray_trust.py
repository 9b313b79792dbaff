"""Where a real cluster differs from one machine, checked without one: which Tune state is the newest when clocks or
time zones disagree, whether one trial fits any node, what the driver's tasks ask for, and the Ray internals the
trainable relies on to get its files off a worker node."""
import json
import os
import time

import pytest

from sweeps.tune import ray_env
from sweeps.storage import tune_state


def _state(d, session, start, trials):
    with open(os.path.join(d, f"experiment_state-{session}.json"), "w") as f:
        json.dump({"trial_data": trials, "stats": {"start_time": start}}, f)
    for name in (f"search_gen_state-{session}.json", f"searcher-state-{session}.pkl"):
        with open(os.path.join(d, name), "w") as f:
            f.write(session)


def test_the_newest_state_is_the_one_that_started_last_whatever_its_name(tmp_path):
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    d = str(tmp_path)
    # started on a UTC head at 20:00, resumed an hour later from a laptop in UTC-5: a newer state, a smaller name
    t0 = 1_796_155_200.0  # 2026-12-01 20:00:00 UTC
    _state(d, "2026-12-01_20-00-00", t0, [])
    done = [{"trial_id": "a1", "status": "TERMINATED", "config": {"train.seed": 0}},
            {"last_result": {"final": 1, "images_seen": 384}}]
    running = [done[0] | {"status": "RUNNING"}, {"last_result": {"images_seen": 128}}]
    _state(d, "2026-12-01_20-00-00", t0, [running])
    _state(d, "2026-12-01_16-00-00", t0 + 3600, [done])
    assert tune_state.newest_experiment_state(d).endswith("experiment_state-2026-12-01_16-00-00.json")
    from sweeps.results.trials import tune_states

    assert tune_states(d)["a1"]["state"] == "TERMINATED"  # what status, best and finish read
    # Tune itself takes the largest name: the stale one (this is the rule the set-aside answers)
    assert _find_newest_experiment_checkpoint(d).endswith("2026-12-01_20-00-00.json")
    moved = tune_state.set_aside_stale(d)
    assert sorted(moved) == ["experiment_state-2026-12-01_20-00-00.json", "search_gen_state-2026-12-01_20-00-00.json",
                             "searcher-state-2026-12-01_20-00-00.pkl"]
    assert _find_newest_experiment_checkpoint(d).endswith("2026-12-01_16-00-00.json")
    assert sorted(os.listdir(os.path.join(d, tune_state.STALE))) == sorted(moved)
    assert tune_state.set_aside_stale(d) == []  # nothing left that only looks newer


def test_states_whose_names_agree_with_their_times_are_left_alone(tmp_path):
    d = str(tmp_path)
    _state(d, "2026-12-01_20-00-00", 1_796_155_200.0, [])
    _state(d, "2026-12-01_21-00-00", 1_796_158_800.0, [])
    assert tune_state.newest_experiment_state(d).endswith("2026-12-01_21-00-00.json")
    assert tune_state.set_aside_stale(d) == []
    assert len(os.listdir(d)) == 6


def test_the_driver_pins_utc_before_tune_names_anything(monkeypatch):
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    try:
        assert time.localtime().tm_gmtoff == -5 * 3600
        tune_state.pin_utc()
        assert time.localtime().tm_gmtoff == 0 and os.environ["TZ"] == "UTC"
        # the name Tune 2.60 gives a session started now (tune_controller: datetime.fromtimestamp(...).strftime)
        from datetime import datetime, timezone

        now = time.time()
        assert datetime.fromtimestamp(now).strftime("%H") == datetime.fromtimestamp(now, timezone.utc).strftime("%H")
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("cpu,gpu,nodes,needle", [
    (1, 0.5, [{"CPU": 2.0}], "resources.gpu 0.5: no Ray node has a GPU share of 0.5"),
    (4, 0, [{"CPU": 2.0}, {"CPU": 0.0}], "resources.cpu 4: no Ray node has 4 CPU(s)"),
    (2, 1, [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0}], "resources.cpu 2: no Ray node has 2 CPU(s) and 1 GPU"),
])
def test_a_trial_that_fits_no_node_is_named(cpu, gpu, nodes, needle):
    why = ray_env.fit_problem(cpu, gpu, nodes)
    assert why.startswith(needle) and "Ray sees" in why, why


def test_a_trial_that_fits_one_node_passes():
    assert ray_env.fit_problem(1, 0.5, [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]) == ""
    assert ray_env.fit_problem(0.5, 0, [{"CPU": 0.5}]) == ""


def test_driver_tasks_ask_for_one_trials_share_on_a_cluster():
    from sweeps.tune.driver_tasks import task_options

    assert task_options(1, 0) == {"num_cpus": 1}  # never the largest node of a shared cluster
    assert task_options(2, 0.5) == {"num_cpus": 2, "num_gpus": 0.5}
    assert task_options(2, 0.5, whole_node=True) == {"num_cpus": 2, "num_gpus": 0.5}


def test_ray_still_uploads_the_trials_working_directory():
    """The trainable writes its files where Ray's artifact sync reads them (Ray 2.60 DeveloperAPI)."""
    import inspect

    from ray.train._internal.storage import StorageContext
    from ray.tune.context import TuneContext

    assert hasattr(TuneContext, "get_storage")
    assert isinstance(StorageContext.trial_working_directory, property)
    src = inspect.getsource(StorageContext.persist_artifacts)
    assert "local_dir=self.trial_working_directory" in src and "remote_dir=self.trial_fs_path" in src


def test_a_trial_continued_elsewhere_fetches_its_snapshots_from_the_storage(tmp_path):
    """A trial restarted on a node that never had its power-EMA snapshots copies those it uploaded when it took
    them from its storage folder (here a local pyarrow filesystem, as for a local storage path), replaces stale
    local copies, leaves anything that is not a snapshot alone, and writes each file whole."""
    import pyarrow.fs as pafs

    from sweeps.tune.trainable import fetch_snapshots, put_file, snapshot_dir

    fs = pafs.LocalFileSystem()
    remote = tmp_path / "storage" / "trial" / "p2"
    (remote / "ema_snapshots").mkdir(parents=True)
    for n in (16, 32, 48):
        (remote / "ema_snapshots" / f"snap_{n:012d}.pt").write_bytes(b"remote %d" % n)
    (remote / "ema_snapshots" / ".tmp-snap").write_bytes(b"partial")
    out = tmp_path / "work.ema_snapshots"
    assert fetch_snapshots(fs, str(remote), str(out)) == [f"snap_{n:012d}.pt" for n in (16, 32, 48)]
    (out / f"snap_{32:012d}.pt").write_bytes(b"local 32")  # left here by an abandoned attempt
    put_file(fs, str(tmp_path / "work.ema_snapshots" / f"snap_{48:012d}.pt"),
             str(remote / "ema_snapshots" / f"snap_{64:012d}.pt"))  # the upload a trial makes of each snapshot
    assert fetch_snapshots(fs, str(remote), str(out)) == [f"snap_{n:012d}.pt" for n in (16, 32, 48, 64)]
    assert sorted(os.listdir(out)) == [f"snap_{n:012d}.pt" for n in (16, 32, 48, 64)]
    assert (out / f"snap_{32:012d}.pt").read_bytes() == b"remote 32"  # the storage's copy wins
    assert (out / f"snap_{64:012d}.pt").read_bytes() == b"remote 48"
    assert not [f for f in os.listdir(remote / "ema_snapshots") if f.startswith(".tmp-snap_")]
    assert fetch_snapshots(fs, str(tmp_path / "nothing" / "p2"), str(out)) == []
    assert snapshot_dir("/s/working_dirs/g0s0-ab/") == "/s/working_dirs/g0s0-ab.ema_snapshots"
