"""The Tune callback that writes a sweep's runs from the driver (trials never contend for the SQLite store). MLflow
being slow or down never ends a sweep or fails a trial: what could not be written is queued (`repair`)."""
from __future__ import annotations

import logging
import os

from ray.tune import Callback

from .. import compat
from ..storage import trial_files as TF
from .client import Retrying, client, one_line
from .runs import TrialRuns, close_run, result_metrics
from .repair import queue_pending

log = logging.getLogger("p2sweep.tracking")


class MLflowTracker(Callback):
    """Logs each trial into its child run under the sweep's parent run; never raises into Tune."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, base_flat: dict, metric: str,
                 max_images: int, sweep: str, exp_dir: str):
        self.uri, self.experiment, self.parent = uri, experiment, parent_run_id
        self.base_flat, self.metric, self.max_images, self.sweep = base_flat, metric, max_images, sweep
        self.exp_dir = exp_dir
        self._runs = None
        self._c = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_runs"] = d["_c"] = None
        return d

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            # one Retrying for the tracker's life (per address), also while TrialRuns cannot be built (the server
            # down at the first event): its down state is what makes later events fail at once
            c = getattr(self, "_c", None)  # absent in a tracker pickled by an older version
            if c is None or c[0] != self.uri:
                self._c = c = (self.uri, Retrying(client(self.uri)))
            self._runs = TrialRuns(c[1], self.experiment, self.parent, self.base_flat, self.sweep)
        return self._runs

    def _safely(self, what: str, trial, fn, pending: dict) -> None:
        try:
            fn()
        except Exception as e:  # MLflow down after retries: queue it, keep the sweep going
            log.warning("MLflow: could not %s for trial %s (%s); queued for the end of the run", what,
                        trial.trial_id, one_line(e))
            try:
                queue_pending(self.exp_dir, {"trial_id": trial.trial_id, "config": dict(trial.config), **pending})
            except Exception as e2:  # the storage is down too: lose this record, never the sweep
                log.warning("MLflow record for trial %s lost: the queue in %s is not writable either (%s)",
                            trial.trial_id, self.exp_dir, one_line(e2))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safely("create the run", trial, lambda: self.runs.get(trial.trial_id, trial.config, str(trial)),
                     {"op": "run"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        try:
            ms = result_metrics(self.metric, result)
        except Exception as e:  # a malformed report must not fail the trial either
            log.warning("MLflow: unreadable report of trial %s (%s)", trial.trial_id, e)
            return

        def send():
            rid = self.runs.get(trial.trial_id, trial.config, str(trial))
            for i in range(0, len(ms), 500):
                self.runs.c.log_batch(rid, metrics=ms[i:i + 500])
            if result.get("diverged"):
                self.runs.c.set_tag(rid, "p2sweep.diverged", result.get("diverged_reason", "non-finite loss"))

        self._safely("log metrics", trial, send,
                     {"op": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in ms]})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, error=True)

    def _close(self, trial, error: bool):
        res = trial.last_result or {}

        def close():
            rid = self.runs.get(trial.trial_id, trial.config, str(trial))
            c = self.runs.c
            c.set_tag(rid, "p2sweep.images_seen", str(res.get("images_seen", 0)))
            if error:
                c.set_tag(rid, "p2sweep.failure", "trial raised (retries exhausted); see its error.txt")
            elif res.get("diverged"):
                c.set_tag(rid, "p2sweep.failure", res.get("diverged_reason", "diverged"))
            self.runs.log_artifacts(rid, trial_files_dir(trial, self.exp_dir))
            close_run(c, rid, failed=error or bool(res.get("diverged")), images_seen=int(res.get("images_seen", 0)),
                      max_images=self.max_images)

        self._safely("close the run", trial, close, {"op": "close"})


def _working_dir(trial) -> str | None:
    """The trial's working directory on this machine's Ray session, where it writes p2/ (present here when the trial
    ran on the driver's node)."""
    return compat.trial_working_directory(trial)  # None: no storage context or folder name yet, or no Ray here


def trial_files_dir(trial, exp_dir: str) -> str:
    """Where the driver reads a trial's own files: the storage (where Ray copies them from whichever node ran the
    trial) or the trial's working directory on this machine, whichever holds the longer `metrics.jsonl` (it is only
    appended to: Ray's last copy may not have landed when the trial ends, and a report without a checkpoint, such as
    a divergence, forces no copy); the storage on a tie."""
    from ..storage import fs as storage

    stored = storage.join(exp_dir, os.path.basename(trial.path.rstrip("/"))) if trial.path else ""
    # its working directory here, else the driver's staging folder (where earlier p2sweep versions wrote p2/)
    local = _working_dir(trial) or compat.trial_staging_dir(trial)
    has_stored = bool(stored) and storage.isdir(TF.files_dir(stored))
    has_local = bool(local) and os.path.isdir(TF.files_dir(local))
    if has_stored and has_local:
        return local if TF.metrics_size(local) > TF.metrics_size(stored) else stored
    if has_stored:
        return stored
    if has_local:
        return local
    return stored or local or ""
