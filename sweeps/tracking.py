"""MLflow tracking from the driver: one parent run per sweep, exactly one child run per (configuration, seed).

All MLflow writes happen in the driver (a Ray Tune Callback), so trials never contend for the SQLite store. A child
run is keyed by its replicate `<group>:<seed>` (tag `p2sweep.replicate`) and tagged with the Tune trial id, so a
retried trial, a resumed trial and a trial that a driver crash lost and Tune re-created under a new id all log into
the same run. MLflow being slow or down never ends a sweep or fails a trial (Tune treats an exception in a callback
as a trial failure): every call is retried with backoff, then what could not be written is queued in
`<experiment>/p2sweep_mlflow_pending.jsonl` and written by `finish` (end of run/resume) or the next resume.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from ray.tune import Callback

from .report import GROUP_KEY, TrialReport

log = logging.getLogger("p2sweep.tracking")
ROLE = "p2sweep.role"
TRIAL_ID = "p2sweep.trial_id"
REPLICATE = "p2sweep.replicate"
PENDING = "p2sweep_mlflow_pending.jsonl"
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # about a minute in all, then the write is queued


def client(uri: str):
    """A client for `uri` only. (Not mlflow.set_tracking_uri: it also sets $MLFLOW_TRACKING_URI, which would
    send the next sweep started in the same process to this sweep's store.)"""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class Retrying:
    """An MlflowClient whose calls are retried with backoff ("database is locked", a server down for a minute).
    After one call has used up its retries, later calls try once until one succeeds, so a dead server costs one
    minute, not one minute per call."""

    def __init__(self, inner):
        self._inner, self._down = inner, False

    def __getattr__(self, name):
        fn = getattr(self._inner, name)
        if not callable(fn):
            return fn

        def call(*a, **kw):
            delays = () if self._down else RETRY_DELAYS
            for i in range(len(delays) + 1):
                try:
                    out = fn(*a, **kw)
                    self._down = False
                    return out
                except Exception as e:
                    if i == len(delays):
                        self._down = True
                        raise
                    log.warning("MLflow %s failed (%s); retrying in %.1f s", name, str(e).splitlines()[0][:120],
                                delays[i])
                    time.sleep(delays[i])
        return call


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it (<storage>/mlartifacts), not in the current directory's ./mlruns;
    a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def ensure_experiment(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(c.tracking_uri)
    return c.create_experiment(name, artifact_location=os.path.join(root, name) if root else None,
                               tags={"mlflow.experimentKind": "custom_model_development"})


def log_params(c, rid: str, params: dict) -> None:
    from mlflow.entities import Param

    batch = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(rid, params=batch[i:i + 100])


def close_run(c, rid: str, *, failed: bool, images_seen: int, max_images: int) -> None:
    """The one rule for a finished trial's run: FAILED (error, divergence) or FINISHED, tagged with the rung when
    ASHA ended it before max_images."""
    if not failed and images_seen < max_images:
        c.set_tag(rid, "p2sweep.stopped_at_rung", str(images_seen))
    c.set_terminated(rid, "FAILED" if failed else "FINISHED")


def finite_metrics(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def replicate_key(config: dict) -> str:
    return f"{config.get(GROUP_KEY, '-')}:{config.get('train.seed', '-')}"


class TrialRuns:
    """Child runs of one sweep: found by replicate key, created with the trial's params and config artifacts."""

    def __init__(self, c, experiment: str, parent: str, base_flat: dict, sweep: str):
        self.c, self.parent, self.base_flat, self.sweep = c, parent, base_flat, sweep
        self.exp = ensure_experiment(c, experiment)
        self._ids: dict = {}
        self._tagged: dict = {}

    def get(self, trial_id: str, config: dict, label: str = "") -> str:
        key = replicate_key(config)
        if key in self._ids:
            rid = self._ids[key]
        else:
            found = self.c.search_runs([self.exp], filter_string=f"tags.`{REPLICATE}` = '{key}' and "
                                                                 f"tags.`mlflow.parentRunId` = '{self.parent}'",
                                       max_results=1)
            if found:
                rid = found[0].info.run_id
                if found[0].info.status != "RUNNING":
                    self.c.update_run(rid, status="RUNNING")
            else:
                rid = self._create(key, config, label or trial_id)
            self._ids[key] = rid
        if self._tagged.get(rid) != trial_id:  # the latest Tune trial of this replicate (it changes after a crash)
            self.c.set_tag(rid, TRIAL_ID, trial_id)
            self._tagged[rid] = trial_id
        return rid

    def _create(self, key: str, config: dict, label: str) -> str:
        run = self.c.create_run(self.exp, run_name=label, tags={
            "mlflow.parentRunId": self.parent, ROLE: "trial", REPLICATE: key, "p2sweep.sweep": self.sweep})
        rid = run.info.run_id
        params = {**self.base_flat, **config}
        log_params(self.c, rid, params)
        self._log_trial_config(rid, {k: v for k, v in params.items() if k != GROUP_KEY})
        return rid

    def _log_trial_config(self, rid, params):
        import tempfile

        import yaml

        from p2core.config import apply_overrides, config_from_dict
        from p2core.schedules import named_snr
        from p2core.weighting import make_weighting, plot_weighting

        nested = apply_overrides({}, params)
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "trial_config.yaml")
            with open(p, "w") as f:
                yaml.safe_dump(nested, f, sort_keys=False)
            self.c.log_artifact(rid, p)
            df = config_from_dict(nested).diffusion
            snr = named_snr(df.noise_schedule, df.diffusion_steps)
            w = make_weighting(df.weighting, df.p2_gamma, df.p2_k, df.min_snr_gamma)
            self.c.log_artifact(rid, plot_weighting(os.path.join(d, "weight_vs_snr.png"),
                                                    [(f"{df.noise_schedule}: {w.label}", snr, w(snr))]))

    def log_artifacts(self, rid: str, trial_dir: str) -> None:
        log_trial_files(self.c, rid, trial_dir)


def log_trial_files(c, rid: str, trial_dir: str) -> None:
    """The trial's own files (its `p2/` folder in the storage) as the run's artifacts."""
    from . import storage

    if storage.is_uri(trial_dir):  # MLflow uploads from local files: copy the folder out of the bucket first
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            if storage.download(storage.join(trial_dir, "p2"), os.path.join(tmp, "p2")):
                log_trial_files(c, rid, tmp)
        return
    d = os.path.join(trial_dir, "p2")
    if not os.path.isdir(d):
        return
    for name in ("config.yaml", "loss.png", "metrics.jsonl"):
        if os.path.exists(os.path.join(d, name)):
            c.log_artifact(rid, os.path.join(d, name))
    sd = os.path.join(d, "samples")
    if os.path.isdir(sd):
        c.log_artifacts(rid, sd, "samples")


def result_metrics(metric: str, result: dict) -> list:
    """MLflow metrics of one trial report: the training log since the last report and every evaluation."""
    from mlflow.entities import Metric

    rep = TrialReport.from_result(metric, result)
    ts = int(time.time() * 1000)
    ms = []
    for rec in rep.train_log:
        s = int(rec.get("images_seen", rep.images_seen))
        ms += [Metric(k, v, ts, s) for k, v in finite_metrics(rec).items() if k not in ("images_seen", "step")]
    ms += [Metric(k, v, ts, rep.images_seen) for k, v in finite_metrics(rep.evals).items()]
    return ms


class MLflowTracker(Callback):
    """Logs each trial into its child run under the sweep's parent run; never raises into Tune."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, base_flat: dict, metric: str,
                 max_images: int, sweep: str, exp_dir: str):
        self.uri, self.experiment, self.parent = uri, experiment, parent_run_id
        self.base_flat, self.metric, self.max_images, self.sweep = base_flat, metric, max_images, sweep
        self.exp_dir = exp_dir
        self._runs = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_runs"] = None
        return d

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            self._runs = TrialRuns(Retrying(client(self.uri)), self.experiment, self.parent, self.base_flat,
                                   self.sweep)
        return self._runs

    def _safely(self, what: str, trial, fn, pending: dict) -> None:
        try:
            fn()
        except Exception as e:  # MLflow down after retries: queue it, keep the sweep going
            log.warning("MLflow: could not %s for trial %s (%s); queued for the end of the run", what,
                        trial.trial_id, str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__)
            try:
                queue_pending(self.exp_dir, {"trial_id": trial.trial_id, "config": dict(trial.config), **pending})
            except Exception as e2:  # the storage is down too: lose this record, never the sweep
                log.warning("MLflow record for trial %s lost: the queue in %s is not writable either (%s)",
                            trial.trial_id, self.exp_dir, str(e2).splitlines()[0][:160] if str(e2) else "")

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


def trial_files_dir(trial, exp_dir: str) -> str:
    """Where the driver reads a trial's own files: the storage (where Ray copies them from whichever node ran the
    trial), else the driver's staging folder (a trial that never reported)."""
    from . import storage

    stored = storage.join(exp_dir, os.path.basename(trial.path.rstrip("/"))) if trial.path else ""
    if stored and storage.isdir(storage.join(stored, "p2")):
        return stored
    local = getattr(trial, "local_path", None)
    if local and os.path.isdir(os.path.join(local, "p2")):
        return local
    return stored or local or ""


def queue_pending(exp_dir: str, rec: dict) -> None:
    from .storage import append_text, join

    append_text(join(exp_dir, PENDING), json.dumps(rec, default=str) + "\n")


def write_pending(uri: str, experiment: str, parent_id: str, base_flat: dict, sweep: str, exp_dir: str,
                  trial_dirs: dict) -> int:
    """Write what the tracker had to queue (runs, metrics, artifacts); returns how many records are still queued.
    Closing the runs is `reconcile`'s job."""
    from mlflow.entities import Metric

    from . import storage

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
            log.warning("MLflow still failing (%s): %d record(s) stay queued in %s", str(e).splitlines()[0][:120],
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


def log_baseline(uri: str, experiment: str, parent_id: str, b: dict, cfg, res: dict) -> str:
    """One child run per baseline (tag p2sweep.role=baseline), found again by name: never duplicated."""
    from mlflow.entities import Metric

    c = Retrying(client(uri))
    exp = ensure_experiment(c, experiment)
    found = c.search_runs([exp], filter_string=f"tags.`p2sweep.baseline` = '{b['name']}' and "
                                               f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=f"baseline {b['name']}", tags={
        "mlflow.parentRunId": parent_id, ROLE: "baseline", "p2sweep.baseline": b["name"]})
    rid = run.info.run_id
    log_params(c, rid, {**cfg.flat(), "baseline.checkpoint": b["checkpoint"],
                        "baseline.weights": res.get("weights", "")})
    ts = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in finite_metrics(res).items()])
    c.set_terminated(rid, "FINISHED")
    return rid


# -- the view `p2sweep ui` opens --------------------------------------------------------------------------------------

VIEW_KEY = "p2sweep"  # experiment tag mlflow.sharedViewState.p2sweep; the address carries viewStateShareKey=p2sweep


def compare_view_state(metric: str, params: list, metrics: list) -> dict:
    """The runs-page state (MLflow 3.x UI) of a sweep's comparison: its trials flat (a filter on the trial tag; sorting
    by a metric is what lists child runs flat instead of folded under the parent), sorted by the sweep metric, best
    first, with the swept parameters, the seed and the metric at every sampling spec as columns, every run in charts."""
    col = lambda kind, name: f"{kind}.`{name}`"  # the UI's column key format
    cols = ([col("params", p) for p in params] + [col("params", "train.seed")] +
            [col("metrics", m) for m in metrics])
    return {"searchFilter": f"tags.`{ROLE}` = 'trial'", "orderByKey": col("metrics", metric), "orderByAsc": True,
            "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
            "selectedColumns": cols, "columnOrder": cols, "runsHiddenMode": "SHOW_ALL",
            "hideEmptyCharts": True, "useGroupedValuesInCharts": False}


def set_compare_view(c, experiment_id: str, metric: str, params: list, metrics: list, name: str = "") -> str:
    """Write the view as the experiment tag the runs page loads from `?viewStateShareKey=p2sweep`; returns the page's
    address path. Stored as the UI's own saved-view envelope ({name, createdAt, state}), so it is listed among the
    experiment's saved views too."""
    state = json.dumps(compare_view_state(metric, params, metrics))
    env = {"name": name or f"p2sweep: trials by {metric}", "createdAt": int(time.time() * 1000),
           "updatedAt": int(time.time() * 1000), "state": state}
    value = json.dumps(env)
    if len(value) > 20000:  # the tracking store's tag-value limit
        raise ValueError(f"view state of {len(value)} characters is over MLflow's 20,000")
    c.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", value)
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def view_columns(meta, trials) -> tuple[list, list]:
    """(swept parameters, metric names): the sweep metric's family (one per sampling spec) first, then the other
    metrics the trials evaluated (FID beside KID, rung metrics)."""
    from p2core.metrics import is_metric_name

    from .analysis import family

    params = sorted((meta.raw or {}).get("space") or {})
    fam = family(trials, meta.metric) or [meta.metric]
    other = sorted({k for t in trials for ev in t.points.values() for k in ev if is_metric_name(k)} - set(fam))
    return params, fam + other


def set_sweep_view(c, experiment_id: str, meta, trials) -> str:
    params, metrics = view_columns(meta, trials)
    return set_compare_view(c, experiment_id, meta.metric, params, metrics)


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
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if db and os.path.dirname(db) == new:
        if not os.path.exists(db):
            raise UserError(f"{new}: this sweep's MLflow database {os.path.basename(db)} did not come along when "
                            f"the storage moved from {old}; copy it too")
        con = sqlite3.connect(db, timeout=30)
        try:
            with con:
                for table, col, key in (("experiments", "artifact_location", "experiment_id"),
                                        ("runs", "artifact_uri", "run_uuid")):
                    for k, v in con.execute(f"SELECT {key}, {col} FROM {table}").fetchall():
                        for prefix in ("file://", ""):
                            if v and (v == prefix + old or v.startswith(prefix + old + "/")):
                                con.execute(f"UPDATE {table} SET {col} = ? WHERE {key} = ?",
                                            (prefix + new + v[len(prefix + old):], k))
                                break
        except sqlite3.Error as e:
            raise UserError(f"{db}: cannot point MLflow's artifact locations at the moved storage ({e})") from None
        finally:
            con.close()
        print(f"p2sweep: the storage moved from {old} to {new}: MLflow's artifact locations now point here",
              file=sys.stderr)
    meta.moved_from = ""
    meta.save()


def backfill_artifacts(uri: str, experiment: str, parent_id: str, trials: list) -> int:
    """Log the files of trials whose run lacks them, from the storage. A trial's files can reach the storage after
    the driver closed its run (Ray's last copy runs as the trial's process ends; a trial that resumed at its end
    reports nothing new); by the end of a run or resume every copy has landed. Returns how many runs were given
    their files."""
    from . import storage

    c = Retrying(client(uri))
    exp = ensure_experiment(c, experiment)
    runs = {r.data.tags.get(REPLICATE): r.info.run_id for r in c.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)
        if r.data.tags.get(ROLE) == "trial"}
    done = 0
    for t in trials:
        rid = runs.get(replicate_key(t.config))
        if not rid or not t.dir:
            continue
        have = {a.path for a in c.list_artifacts(rid)}
        stored = set(storage.listdir(storage.join(t.dir, "p2")))
        if (stored & {"metrics.jsonl", "samples", "loss.png"}) - have:
            log_trial_files(c, rid, t.dir)
            done += 1
    return done
