"""What p2sweep's MLflow tracking may trust and what it may write, without a Ray session. Each test names the case of
issue 19 it covers: read-only commands never re-root a storage (3), backfill compares sizes (4), a lost create_run
answer makes no second run (5), a dead tracking server costs a bounded time (11), the address a read-only command
contacts is said first (12), a bucket's report is replaced without a moment of no report (13)."""
import json
import os
import sqlite3
import threading
import time
import types

import pytest

from helpers import ROOT, smoke_raw, write_trial

M = "rkid32_ddim5"


def artifact_locations(db: str) -> dict:
    """Every artifact location MLflow's SQLite store records (experiments and runs), read with sqlite3 itself."""
    con = sqlite3.connect(db)
    try:
        return {**{f"exp {k}": v for k, v in con.execute("SELECT experiment_id, artifact_location FROM experiments")},
                **{f"run {k}": v for k, v in con.execute("SELECT run_uuid, artifact_uri FROM runs")}}
    finally:
        con.close()


def make_sweep(root: str, name: str = "sw") -> dict:
    """A finished 2-trial sweep as `run` leaves it in a path storage: p2sweep.json, trial folders, the trial states
    and its own mlflow.db (parent run with provenance, a trial run with one artifact) under `root`."""
    from sweeps.tracking import client as tclient, runs as truns
    from sweeps.record.meta import STATES, Paths, SweepMeta
    from sweeps.record.spec import parse_sweep

    spec = parse_sweep(smoke_raw(space={"diffusion.p2_gamma": {"grid": [0.0, 1.0]}}),
                       os.path.join(ROOT, "search_spaces"))
    d = os.path.join(root, name)
    states = dict([write_trial(d, "a0", 0, 0, [(128, {M: 0.6}), (384, {M: 0.5})], "TERMINATED"),
                   write_trial(d, "b0", 1, 0, [(128, {M: 0.7}), (384, {M: 0.4})], "TERMINATED")])
    with open(os.path.join(d, STATES), "w") as f:
        json.dump(states, f)
    uri = f"sqlite:///{root}/mlflow.db"
    c = tclient.client(uri)
    exp = truns.ensure_experiment(c, name)
    parent = c.create_run(exp, run_name=f"{name} (sweep)", tags={"p2sweep.role": "sweep"}).info.run_id
    c.log_param(parent, "git_commit", "abc123")
    child = c.create_run(exp, tags={"mlflow.parentRunId": parent, truns.ROLE: "trial"}).info.run_id
    c.log_text(child, "x", "note.txt")
    assert spec.metric == M and spec.max_images == 384 and spec.num_trials() == 2
    SweepMeta(name=name, sweep_id="id0", spec=spec,
              paths=Paths(root, uri, f"sqlite:///{root}/optuna.db", os.path.join(root, "cache")),
              parent_run_id=parent, experiment=name).save()
    return {"exp": exp, "parent": parent, "child": child}


# -- case 3: report and ui never re-root; only resume or `reroot` do ---------------------------------------------------

def test_report_and_ui_of_a_moved_storage_leave_its_store_alone_and_reroot_does_it(tmp_path, capsys, monkeypatch):
    import subprocess

    from sweeps.cli import main
    from sweeps.record.meta import META, load_meta
    from sweeps.commands.sweep import cmd_report, cmd_ui

    # exported for other work: a sweep's own SQLite store is still read from the storage, not from there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    old, new = str(tmp_path / "head_mount"), str(tmp_path / "other_mount")
    ids = make_sweep(old)
    os.rename(old, new)  # the recorded root is absent (another machine's mount point of the same folder)
    db, meta_file = os.path.join(new, "mlflow.db"), os.path.join(new, "sw", META)
    locs, meta_bytes = artifact_locations(db), open(meta_file, "rb").read()
    ours = {k: v for k, v in locs.items() if k != "exp 0"}  # not MLflow's Default experiment (./mlruns)
    assert all(v.startswith(old) for v in ours.values()) and len(ours) == 3  # the sweep's experiment, 2 runs
    capsys.readouterr()

    assert cmd_report(types.SimpleNamespace(name="sw", storage=new, out=None, no_mlflow=False)) == 0
    err = capsys.readouterr().err
    assert f"p2sweep: reading MLflow at sqlite:///{new}/mlflow.db (from p2sweep.json: the sweep's own file store)" \
        in err  # case 12: said before it is read
    assert f"report not logged to MLflow: the storage moved from {old}" in err and "p2sweep reroot sw" in err
    assert os.path.isfile(os.path.join(new, "sw", "report", "report.html"))  # the report itself is written
    assert artifact_locations(db) == locs and open(meta_file, "rb").read() == meta_bytes
    assert not os.path.exists(old)  # nothing logged under the absent old root either

    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: seen.update(cmd=cmd) or 0)
    assert cmd_ui(types.SimpleNamespace(name="sw", storage=new, host="127.0.0.1", port=5055)) == 0
    out = capsys.readouterr()
    assert f"MLflow UI: http://127.0.0.1:5055/#/experiments/{ids['exp']}/runs" in out.out
    assert f"p2sweep: reading MLflow at sqlite:///{new}/mlflow.db (from p2sweep.json" in out.err
    assert seen["cmd"][seen["cmd"].index("--backend-store-uri") + 1] == f"sqlite:///{new}/mlflow.db"
    assert artifact_locations(db) == locs and open(meta_file, "rb").read() == meta_bytes
    assert load_meta("sw", new).moved_from == old

    assert main(["reroot", "sw", "--storage", new]) == 0  # the explicit command (resume calls the same follow_move)
    assert artifact_locations(db) == {**locs, **{k: new + v[len(old):] for k, v in ours.items()}}
    assert load_meta("sw", new).moved_from == ""


def test_ui_of_a_tracking_server_says_its_address_first_and_the_environment_wins(tmp_path, capsys, monkeypatch):
    """Case 12 for `ui`: a p2sweep.json naming a server (nothing listens on 127.0.0.1:8 or :9): the address it is
    about to contact is printed first, a password in it never; $MLFLOW_TRACKING_URI, when set, is used instead."""
    from sweeps.record.meta import load_meta
    from sweeps.commands.sweep import cmd_ui

    make_sweep(str(tmp_path))
    meta = load_meta("sw", str(tmp_path))
    meta.paths.mlflow_uri = "http://someone:hunter2@127.0.0.1:8"
    meta.save()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = types.SimpleNamespace(name="sw", storage=str(tmp_path), host="127.0.0.1", port=5055)
    capsys.readouterr()
    t0 = time.monotonic()
    assert cmd_ui(args) == 0
    out = capsys.readouterr()
    assert out.err.startswith("p2sweep: reading MLflow at http://someone:***@127.0.0.1:8 (from p2sweep.json; "
                              "MLFLOW_TRACKING_URI overrides)\n")
    assert "MLflow UI of this sweep (its tracking server): http://someone:***@127.0.0.1:8/" in out.out
    assert "hunter2" not in out.out + out.err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert cmd_ui(args) == 0
    out = capsys.readouterr()
    assert out.err.startswith("p2sweep: reading MLflow at http://127.0.0.1:9 (from MLFLOW_TRACKING_URI; p2sweep.json "
                              "names http://someone:***@127.0.0.1:8)\n")
    assert "(its tracking server): http://127.0.0.1:9/" in out.out and "hunter2" not in out.out + out.err
    assert time.monotonic() - t0 < 60  # a refused connection is not retried for minutes (2 x one bounded call)


# -- case 4: backfill compares sizes; the fresher copy of a trial's files wins -----------------------------------------

def _trial_files(d: str, records: int, grids: list) -> None:
    os.makedirs(os.path.join(d, "p2", "samples"), exist_ok=True)
    with open(os.path.join(d, "p2", "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps({"images_seen": 64 * (i + 1), "loss": 1.0}) + "\n" for i in range(records)))
    for g in grids:
        with open(os.path.join(d, "p2", "samples", f"grid_{g:012d}.png"), "wb") as f:
            f.write(b"png" * g)


def test_backfill_replaces_a_truncated_metrics_log_and_adds_the_last_grid(tmp_path):
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import repair as trepair, runs as truns

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    real = MlflowClient(uri)
    exp = truns.ensure_experiment(real, "s")
    parent = real.create_run(exp).info.run_id
    runs = truns.TrialRuns(real, "s", parent, {"train.lr": 0.001}, "s")
    config = {"p2sweep_group": 0, "train.seed": 0}
    rid = runs.get("t1", config)
    tdir = str(tmp_path / "exp" / "trial_t1")
    _trial_files(tdir, 3, [128])
    runs.log_artifacts(rid, tdir)  # the run closed before Ray's last copy landed
    _trial_files(tdir, 5, [128, 256])  # ... which then did
    trial = types.SimpleNamespace(config=config, dir=tdir)
    assert trepair.backfill_artifacts(uri, "s", parent, [trial]) == 1
    lines = open(real.download_artifacts(rid, "metrics.jsonl", str(tmp_path / "dl"))).read().splitlines()
    assert len(lines) == 5
    assert sorted(a.path for a in real.list_artifacts(rid, "samples")) == [
        "samples/grid_000000000128.png", "samples/grid_000000000256.png"]
    assert trepair.backfill_artifacts(uri, "s", parent, [trial]) == 0  # nothing differs now: nothing re-logged


def test_trial_files_come_from_the_copy_with_the_longer_metrics_log(tmp_path):
    from sweeps.tracking.callback import trial_files_dir

    exp_dir, local = str(tmp_path / "exp"), str(tmp_path / "session" / "working_dirs" / "trial_t1")
    stored = os.path.join(exp_dir, "trial_t1")
    # as a Tune Trial on the driver: its storage context names the working directory the trial writes p2/ into
    trial = types.SimpleNamespace(path="/elsewhere/exp/trial_t1", local_path=str(tmp_path / "staging"),
                                  storage=types.SimpleNamespace(trial_working_directory=local))
    _trial_files(stored, 3, [])
    _trial_files(local, 5, [])
    assert trial_files_dir(trial, exp_dir) == local  # Ray has not copied the last records yet
    _trial_files(stored, 5, [])
    assert trial_files_dir(trial, exp_dir) == stored  # the same: the storage


# -- case 5: a lost create_run answer makes no second run --------------------------------------------------------------

class LostAnswer:
    """An MlflowClient whose first create_run makes the run, then raises as if the answer were lost."""

    def __init__(self, inner, call="create_run"):
        self.inner, self.lost, self.call = inner, 0, call

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name != self.call:
            return fn

        def call(*a, **kw):
            out = fn(*a, **kw)
            if self.lost == 0:
                self.lost += 1
                raise ConnectionError("Read timed out (the run was made)")
            return out
        return call


def test_a_lost_create_run_answer_makes_no_second_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from helpers import tiny_cfg
    from sweeps.tracking import client as tclient, runs as truns

    monkeypatch.setattr(tclient, "RETRY_DELAYS", (0.0, 0.0))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    real = MlflowClient(uri)
    exp = truns.ensure_experiment(real, "s")
    count = lambda flt: len(real.search_runs([exp], filter_string=flt))

    pid = real.create_run(exp, tags={"p2sweep.role": "sweep"}).info.run_id
    lost = LostAnswer(real)
    runs = truns.TrialRuns(tclient.Retrying(lost), "s", pid, {"train.lr": 0.001}, "s")
    rid = runs.get("t1", {"p2sweep_group": 0, "train.seed": 0})
    assert lost.lost == 1 and count(f"tags.`{truns.REPLICATE}` = '0:0'") == 1
    assert real.get_run(rid).data.params["train.lr"] == "0.001"  # the found run got its params

    lost = LostAnswer(real)
    monkeypatch.setattr(truns, "client", lambda u: lost)  # the client log_baseline makes
    truns.log_baseline(uri, "s", pid, {"name": "ours", "checkpoint": "x.pt"}, tiny_cfg(), {M: 0.5})
    assert lost.lost == 1 and count("tags.`p2sweep.baseline` = 'ours'") == 1

    lost = LostAnswer(real)  # the sweep's parent run, as runner.run creates it
    parent = truns.create_run_once(tclient.Retrying(lost), exp, "s (sweep)",
                                      {"p2sweep.role": "sweep", "p2sweep.sweep_id": "id1"}, "p2sweep.sweep_id")
    assert lost.lost == 1 and count("tags.`p2sweep.sweep_id` = 'id1'") == 1
    assert parent.data.tags["p2sweep.sweep_id"] == "id1"

    lost = LostAnswer(real, "create_experiment")  # the sweep's experiment: made, its answer lost
    eid = truns.ensure_experiment(tclient.Retrying(lost), "s2")
    assert lost.lost == 1 and real.get_experiment_by_name("s2").experiment_id == eid


# -- case 11: a dead tracking server costs seconds, not half an hour --------------------------------------------------

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
BOUND_S = 30.0  # the most one tracked call (one Tune callback event) may block


def test_probe_of_a_dead_tracking_server_fails_in_seconds_with_one_line():
    from p2core.errors import UserError
    from sweeps.tracking.client import probe_tracking

    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        probe_tracking(DEAD, timeout=3)
    assert time.monotonic() - t0 < 5
    assert str(e.value) == ("tracking.mlflow_uri http://127.0.0.1:9: no MLflow tracking server answers there "
                            "(connection refused or host unreachable)")
    probe_tracking("sqlite:////nonexistent/mlflow.db")  # a file store is not probed


def test_a_dead_tracking_server_blocks_each_tracker_event_a_bounded_time(tmp_path, monkeypatch):
    """A real MLflow client on a refused address, p2sweep's budget scaled down 10x (3 s a call, 1 s a request; the
    defaults are 30 s and 10 s: measured, the first event then gave up after about 15.5 s): the first event retries
    within the budget and gives up inside it, the next ones fail at once; all three are queued. Before the bound,
    MLflow's own 7 retries (about 4 minutes a call) under p2sweep's 8 tries made it half an hour."""
    from sweeps.tracking import callback as tcallback, client as tclient, repair as trepair

    monkeypatch.setattr(tclient, "CALL_BUDGET_S", BOUND_S / 10)
    monkeypatch.setattr(tclient, "HTTP_TIMEOUT_S", 1)
    monkeypatch.setitem(tclient.HTTP_ENV, "MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    exp_dir = str(tmp_path / "exp")
    tr = tcallback.MLflowTracker(DEAD, "s", "p", {}, M, 384, "s", exp_dir)
    trial = types.SimpleNamespace(trial_id="t1", config={"p2sweep_group": 0, "train.seed": 0}, path="",
                                  last_result={"images_seen": 128})
    took = []

    def events():
        for ev in (lambda: tr.on_trial_start(0, [], trial),
                   lambda: tr.on_trial_result(0, [], trial, {M: 0.5, "images_seen": 128, "train_log": "[]"}),
                   lambda: tr.on_trial_complete(0, [], trial)):
            t0 = time.monotonic()
            ev()
            took.append(time.monotonic() - t0)

    th = threading.Thread(target=events, daemon=True)  # daemon: an unbounded call fails the test, not the session
    th.start()
    th.join(BOUND_S + 10)
    assert not th.is_alive() and len(took) == 3, f"still blocked after {BOUND_S + 10:.0f} s: {took}"
    # retried (waits of 0.5 s and 1 s), then the next wait would end past the budget: given up inside it
    assert 1.5 <= took[0] < BOUND_S / 10 and took[1] < 1 and took[2] < 1, took
    with open(os.path.join(exp_dir, trepair.PENDING)) as f:
        assert [json.loads(line)["op"] for line in f] == ["run", "metrics", "close"]
    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # set only around p2sweep's calls
        assert k not in os.environ


# -- case 13: a bucket's report is replaced file by file, never deleted first -------------------------------------------

@pytest.fixture
def s3(monkeypatch):
    """An S3 API (moto, in this process) on 127.0.0.1 with one bucket; the AWS variables p2sweep's storage reads."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1").create_bucket(Bucket="p2bucket")
    yield "s3://p2bucket"
    server.stop()


def test_a_bucket_report_is_uploaded_over_the_old_one_then_pruned(tmp_path, s3, monkeypatch, capsys):
    """Through `_report` on an s3:// sweep folder (moto): at every deletion the bucket's report.html is already the
    new page; afterwards the bucket holds exactly the new report (the old report's extra figure gone)."""
    from sweeps.storage import fs as S
    from sweeps.commands import sweep as sweep_commands
    from sweeps.record.meta import load_meta
    from sweeps.results.trials import load_trials

    make_sweep(str(tmp_path))  # the trials and MLflow stay local; the sweep's folder is the bucket's
    meta = load_meta("sw", str(tmp_path))
    meta.paths.storage = s3
    rep = S.join(meta.dir, "report")
    for rel, text in (("report.html", "OLD"), ("report.json", "{}"), ("figures/stale.png", "x")):
        S.write_text(S.join(rep, rel), text)
    seen = []
    real_remove = S.remove
    monkeypatch.setattr(S, "remove", lambda path, tree=False: seen.append(
        (path, tree, S.read_text(S.join(rep, "report.html")))) or real_remove(path, tree))
    tmp = str(tmp_path / "t")
    os.makedirs(tmp)
    trials = load_trials(os.path.join(str(tmp_path), "sw"), M)
    assert sweep_commands._report(types.SimpleNamespace(out=None, no_mlflow=True), meta, trials, tmp) == 0
    new_html = open(os.path.join(tmp, "report", "report.html")).read()
    assert seen and all(html == new_html for _, _, html in seen), [(p, t, (h or "")[:20]) for p, t, h in seen]
    assert not any(tree for _, tree, _ in seen)
    assert S.file_sizes(rep, recursive=True) == S.file_sizes(os.path.join(tmp, "report"), recursive=True)
    assert S.read_text(S.join(rep, "report.html")) == new_html
    assert f"report (finished): {s3}/sw/report/report.html" in capsys.readouterr().out
