"""Repair after trouble: the queue of records MLflow missed (`<experiment>/p2sweep_mlflow_pending.jsonl`, written
at the end of a run/resume), runs a dead driver left RUNNING, trial files that landed after their run closed
(compared by size), and a storage folder that moved."""
from __future__ import annotations

import json
import logging
import os
import sys

from .. import compat
from ..record.replicate import Replicate
from ..storage import layout as L
from .client import Retrying, client, one_line
from ..storage import trial_files as TF
from .runs import REPLICATE, ROLE, TRIAL_ID, TrialRuns, close_run, ensure_experiment, log_trial_files

log = logging.getLogger("p2sweep.tracking")


PENDING = "p2sweep_mlflow_pending.jsonl"


def queue_pending(exp_dir: str, rec: dict) -> None:
    from ..storage.fs import append_text, join

    append_text(join(exp_dir, PENDING), json.dumps(rec, default=str) + "\n")


def write_pending(uri: str, experiment: str, parent_id: str, base_flat: dict, sweep: str, exp_dir: str,
                  trial_dirs: dict) -> int:
    """Write what the tracker had to queue (runs, metrics, artifacts); returns how many records are still queued.
    Closing the runs is `reconcile`'s job."""
    from mlflow.entities import Metric

    from ..storage import fs as storage

    path = storage.join(exp_dir, PENDING)
    text = storage.read_text(path)
    if text is None:
        return 0
    recs = [json.loads(line) for line in text.splitlines() if line.strip()]
    runs = TrialRuns(Retrying(client(uri)), experiment, parent_id, base_flat, sweep)
    left = []
    for rec in recs:
        try:
            rid = runs.get(rec["trial_id"], rec["config"])
            if rec["op"] == "metrics":
                ms = [Metric(k, v, ts, s) for k, v, ts, s in rec["metrics"]]
                for i in range(0, len(ms), 500):
                    runs.c.log_batch(rid, metrics=ms[i:i + 500])
            elif rec["op"] == "close" and rec["trial_id"] in trial_dirs:
                runs.log_artifacts(rid, trial_dirs[rec["trial_id"]])
        except Exception as e:
            log.warning("MLflow still failing (%s): %d record(s) stay queued in %s", one_line(e, 120),
                        len(recs) - len(left), path)
            left = recs[recs.index(rec):]
            break
    if left:
        storage.write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in left))
    else:
        storage.remove(path)
    return len(left)


def reconcile(uri: str, experiment: str, parent_id: str, trial_states: dict, max_images: int) -> None:
    """Close runs left RUNNING (a driver that died, a trial that Ray stopped): state from the trial table. A run whose
    trial Tune no longer knows (asked after its last state save, then lost in a driver crash) is KILLED."""
    c = Retrying(client(uri))
    exp = ensure_experiment(c, experiment)
    runs = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)
    for r in runs:
        if r.info.status != "RUNNING" or r.data.tags.get(ROLE) != "trial":
            continue
        st = trial_states.get(r.data.tags.get(TRIAL_ID))
        if st is None:
            c.set_tag(r.info.run_id, "p2sweep.lost", "the driver died before Ray Tune saved this trial")
            c.set_terminated(r.info.run_id, "KILLED")
        elif st["state"] in ("RUNNING", "PENDING", "PAUSED"):  # interrupted; `p2sweep resume` reopens it
            c.set_tag(r.info.run_id, "p2sweep.interrupted_at", str(st.get("images_seen", 0)))
            c.set_terminated(r.info.run_id, "KILLED")
        else:
            close_run(c, r.info.run_id, failed=st["state"] == "ERROR" or bool(st.get("diverged")),
                      images_seen=int(st.get("images_seen", 0)), max_images=max_images)


def follow_move(meta) -> None:
    """After the storage folder was moved or copied (`meta.moved_from` is its old root; nothing to do when it is
    empty). Its own SQLite store records
    absolute artifact locations under the old root: point them at the new one, so the UI shows the artifacts and new
    ones land beside the store; then record the new root in `p2sweep.json`. A tracking server, and locations outside
    the old root, are left alone."""
    import sqlite3

    from p2core.errors import UserError

    if not meta.moved_from:
        return
    old, new, uri = meta.moved_from, meta.paths.storage, meta.paths.mlflow_uri
    db = L.sqlite_file(uri)
    if db and os.path.dirname(db) == new:
        if not os.path.exists(db):
            raise UserError(f"{new}: this sweep's MLflow database {os.path.basename(db)} did not come along when "
                            f"the storage moved from {old}; copy it too")
        con = sqlite3.connect(db, timeout=30)
        try:
            with con:
                compat.repoint_artifact_locations(con, old, new)
        except sqlite3.Error as e:
            raise UserError(f"{db}: cannot point MLflow's artifact locations at the moved storage ({e})") from None
        finally:
            con.close()
        print(f"p2sweep: the storage moved from {old} to {new}: MLflow's artifact locations now point here",
              file=sys.stderr)
    meta.moved_from = ""
    meta.save()


def backfill_artifacts(uri: str, experiment: str, parent_id: str, trials: list) -> int:
    """Log the files of trials whose run lacks them or holds another version of them (its size differs), from the
    storage. A trial's files can reach the storage after the driver closed its run (Ray's last copy runs as the
    trial's process ends; a trial that resumed at its end reports nothing new), so a run can hold a truncated
    `metrics.jsonl` or miss the last sample grid; by the end of a run or resume every copy has landed, and the
    storage's files are the trial's. Returns how many runs were given files."""
    c = Retrying(client(uri))
    exp = ensure_experiment(c, experiment)
    runs = {r.data.tags.get(REPLICATE): r.info.run_id for r in c.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)
        if r.data.tags.get(ROLE) == "trial"}
    done = 0
    for t in trials:
        rid = runs.get(Replicate.of(t.config).key)
        if not rid or not t.dir:
            continue
        stored = TF.run_file_sizes(t.dir)
        if not stored:
            continue
        have = {a.path: a.file_size for a in c.list_artifacts(rid) if not a.is_dir}
        have.update({a.path: a.file_size for a in c.list_artifacts(rid, TF.SAMPLES) if not a.is_dir})
        stale = sorted(rel for rel, size in stored.items() if have.get(rel) != size)
        if stale:
            log_trial_files(c, rid, t.dir, stale)
            done += 1
    return done
