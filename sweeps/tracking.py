"""MLflow tracking from the driver: one parent run per sweep, exactly one child run per trial.

All MLflow writes happen in the driver (a Ray Tune Callback), so trials never contend for the SQLite store. Child
runs are found again by the tag `p2sweep.trial_id` (after retries and `p2sweep resume`), so a trial never gets a
second run, and `reconcile()` closes every run a dead driver left RUNNING.
"""
from __future__ import annotations

import json
import math
import os
import time

from ray.tune import Callback

ROLE = "p2sweep.role"
TRIAL_ID = "p2sweep.trial_id"


def client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


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


def find_trial_run(c, exp_id: str, parent_id: str, trial_id: str):
    runs = c.search_runs([exp_id], filter_string=f"tags.`{TRIAL_ID}` = '{trial_id}' and "
                                                  f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5)
    return runs[0] if runs else None


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


def _finite_metrics(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class MLflowTracker(Callback):
    """Logs each trial into its own child run under the sweep's parent run (ids are looked up, never cached on disk
    beyond the parent id in the experiment's p2sweep.json)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, base_flat: dict, metric: str,
                 max_images: int, spec_name: str):
        self.uri, self.experiment, self.parent = uri, experiment, parent_run_id
        self.base_flat, self.metric, self.max_images, self.spec_name = base_flat, metric, max_images, spec_name
        self._c = None
        self._runs: dict = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_c"], d["_runs"] = None, {}
        return d

    @property
    def c(self):
        if self._c is None:
            self._c = client(self.uri)
            self._exp = ensure_experiment(self._c, self.experiment)
        return self._c

    def run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        c = self.c
        found = find_trial_run(c, self._exp, self.parent, trial.trial_id)
        if found is not None:
            rid = found.info.run_id
            if found.info.status != "RUNNING":
                c.update_run(rid, status="RUNNING")
        else:
            run = c.create_run(self._exp, run_name=str(trial), tags={
                "mlflow.parentRunId": self.parent, ROLE: "trial", TRIAL_ID: trial.trial_id,
                "p2sweep.sweep": self.spec_name})
            rid = run.info.run_id
            params = {**self.base_flat, **trial.config}
            log_params(c, rid, params)
            self._log_trial_config(rid, params)
        self._runs[trial.trial_id] = rid
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

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        rid = self.run_id(trial)
        ts = int(time.time() * 1000)
        step = int(result.get("images_seen", 0))
        ms = []
        for rec in json.loads(result.get("train_log") or "[]"):
            s = int(rec.get("images_seen", step))
            ms += [Metric(k, v, ts, s) for k, v in _finite_metrics(rec).items() if k not in ("images_seen", "step")]
        skip = {"images_seen", "diverged", "final", "loss", "training_iteration", "time_this_iter_s",
                "time_total_s", "timestamp", "pid", "time_since_restore", "iterations_since_restore", "done"}
        evals = {k: v for k, v in _finite_metrics(result).items() if k not in skip and not k.startswith("config")}
        ms += [Metric(k, v, ts, step) for k, v in evals.items()]
        for i in range(0, len(ms), 500):
            self.c.log_batch(rid, metrics=ms[i:i + 500])
        if result.get("diverged"):
            self.c.set_tag(rid, "p2sweep.diverged", result.get("diverged_reason", "non-finite loss"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.close_trial(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.close_trial(trial, error=True)

    def close_trial(self, trial, error: bool):
        rid = self.run_id(trial)
        res = trial.last_result or {}
        self.c.set_tag(rid, "p2sweep.images_seen", str(res.get("images_seen", 0)))
        if error:
            self.c.set_tag(rid, "p2sweep.failure", "trial raised (retries exhausted); see its error.txt")
        elif res.get("diverged"):
            self.c.set_tag(rid, "p2sweep.failure", res.get("diverged_reason", "diverged"))
        self._log_trial_artifacts(rid, trial)
        close_run(self.c, rid, failed=error or bool(res.get("diverged")),
                  images_seen=int(res.get("images_seen", 0)), max_images=self.max_images)

    def _log_trial_artifacts(self, rid, trial):
        d = os.path.join(getattr(trial, "local_path", None) or trial.path, "p2")
        if not os.path.isdir(d):
            return
        for name in ("config.yaml", "loss.png"):
            if os.path.exists(os.path.join(d, name)):
                self.c.log_artifact(rid, os.path.join(d, name))
        sd = os.path.join(d, "samples")
        if os.path.isdir(sd):
            self.c.log_artifacts(rid, sd, "samples")


def reconcile(uri: str, experiment: str, parent_id: str, trial_states: dict, max_images: int) -> None:
    """Close runs left RUNNING (a driver that died, a trial that Ray stopped): state from the trial table."""
    c = client(uri)
    exp = ensure_experiment(c, experiment)
    runs = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)
    for r in runs:
        tid = r.data.tags.get(TRIAL_ID)
        st = trial_states.get(tid)
        if r.info.status != "RUNNING" or st is None:
            continue
        if st["state"] in ("RUNNING", "PENDING", "PAUSED"):  # interrupted; `p2sweep resume` reopens it
            c.set_tag(r.info.run_id, "p2sweep.interrupted_at", str(st.get("images_seen", 0)))
            c.set_terminated(r.info.run_id, "KILLED")
            continue
        close_run(c, r.info.run_id, failed=st["state"] == "ERROR" or bool(st.get("diverged")),
                  images_seen=int(st.get("images_seen", 0)), max_images=max_images)


def log_baseline(uri: str, experiment: str, parent_id: str, b: dict, cfg, res: dict) -> str:
    """One child run per baseline (tag p2sweep.role=baseline), found again by name: never duplicated."""
    from mlflow.entities import Metric

    c = client(uri)
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
    c.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in _finite_metrics(res).items()])
    c.set_terminated(rid, "FINISHED")
    return rid
