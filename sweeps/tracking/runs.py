"""The runs of a sweep: one parent, exactly one child run per (configuration, seed), keyed by its replicate
`<group>:<seed>` (tag `p2sweep.replicate`), created once even when an answer is lost (`create_run_once`); the trial's
files as artifacts; baseline runs."""
from __future__ import annotations

import logging
import math
import os
import time

from .. import compat
from ..storage import layout as L
from ..storage import trial_files as TF
from ..record.replicate import Replicate, trial_config
from ..record.trial_report import TrialReport
from .client import Retrying, client

log = logging.getLogger("p2sweep.tracking")


ROLE = "p2sweep.role"

TRIAL_ID = "p2sweep.trial_id"

REPLICATE = "p2sweep.replicate"


def create_run_once(c, exp: str, run_name: str, tags: dict, key_tag) -> "object":
    """`c.create_run` that never makes two runs: it is not idempotent, and a retry after a lost response (the run was
    made, the answer never came) would make a second. Before each retry the run is looked up by its key tag(s)
    (`key_tag`: a tag name or a tuple of them, whose values are in `tags`); only when none has them is it created
    again. Returns the Run."""
    keys = (key_tag,) if isinstance(key_tag, str) else tuple(key_tag)
    raw = c._inner if isinstance(c, Retrying) else c
    tried = []

    def attempt():
        if tried:
            found = raw.search_runs([exp], filter_string=" and ".join(f"tags.`{k}` = '{tags[k]}'" for k in keys),
                                    max_results=1)
            if found:
                log.warning("MLflow create_run: the run was made though its answer was lost; using %s",
                            found[0].info.run_id)
                return found[0]
        tried.append(1)
        return raw.create_run(exp, run_name=run_name, tags=tags)
    return c.retry("create_run", attempt) if isinstance(c, Retrying) else attempt()


def ensure_experiment(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = L.artifact_root(c.tracking_uri)
    try:
        return c.create_experiment(name, artifact_location=os.path.join(root, name) if root else None,
                                   tags=dict([compat.EXPERIMENT_KIND_TAG]))
    except Exception:  # made by a try whose answer was lost (or by another driver): use it
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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


class TrialRuns:
    """Child runs of one sweep: found by replicate key, created with the trial's params and config artifacts."""

    def __init__(self, c, experiment: str, parent: str, base_flat: dict, sweep: str):
        self.c, self.parent, self.base_flat, self.sweep = c, parent, base_flat, sweep
        self.exp = ensure_experiment(c, experiment)
        self._ids: dict = {}
        self._tagged: dict = {}

    def get(self, trial_id: str, config: dict, label: str = "") -> str:
        key = Replicate.of(config).key
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
        run = create_run_once(self.c, self.exp, label, {
            "mlflow.parentRunId": self.parent, ROLE: "trial", REPLICATE: key, "p2sweep.sweep": self.sweep},
                              (REPLICATE, "mlflow.parentRunId"))
        rid = run.info.run_id
        log_params(self.c, rid, {**self.base_flat, **config})
        self._log_trial_config(rid, config)
        return rid

    def _log_trial_config(self, rid, config):
        import tempfile

        import yaml

        from p2core.config import apply_overrides
        from p2core.schedules import named_snr
        from p2core.weighting import make_weighting, plot_weighting

        cfg = trial_config(apply_overrides({}, self.base_flat), config)
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "trial_config.yaml")
            with open(p, "w") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
            self.c.log_artifact(rid, p)
            df = cfg.diffusion
            snr = named_snr(df.noise_schedule, df.diffusion_steps)
            w = make_weighting(df.weighting, df.p2_gamma, df.p2_k, df.min_snr_gamma)
            self.c.log_artifact(rid, plot_weighting(os.path.join(d, "weight_vs_snr.png"),
                                                    [(f"{df.noise_schedule}: {w.label}", snr, w(snr))]))

    def log_artifacts(self, rid: str, trial_dir: str) -> None:
        log_trial_files(self.c, rid, trial_dir)

def log_trial_files(c, rid: str, trial_dir: str, only=None) -> None:
    """The trial's own files (its `p2/` folder in the storage) as the run's artifacts; with `only`, just those
    (paths relative to `p2/`: "metrics.jsonl", "samples/grid_....png")."""
    from ..storage import fs as storage

    if storage.is_uri(trial_dir):  # MLflow uploads from local files: copy the folder (or the files) out of the bucket
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            if only is None:
                if storage.download(TF.files_dir(trial_dir), os.path.join(tmp, TF.P2)):
                    log_trial_files(c, rid, tmp)
            else:
                for rel in only:
                    storage.download(storage.join(TF.files_dir(trial_dir), *rel.split("/")),
                                     os.path.join(tmp, TF.P2, rel))
                log_trial_files(c, rid, tmp, only)
        return
    d = TF.files_dir(trial_dir)
    if not os.path.isdir(d):
        return
    if only is not None:
        for rel in only:
            if os.path.isfile(os.path.join(d, rel)):
                c.log_artifact(rid, os.path.join(d, rel), os.path.dirname(rel) or None)
        return
    for name in TF.RUN_FILES:
        if os.path.exists(os.path.join(d, name)):
            c.log_artifact(rid, os.path.join(d, name))
    sd = TF.samples_dir(trial_dir)
    if os.path.isdir(sd):
        c.log_artifacts(rid, sd, TF.SAMPLES)


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


def log_baseline(uri: str, experiment: str, parent_id: str, b: dict, cfg, res: dict) -> str:
    """One child run per baseline (tag p2sweep.role=baseline), found again by name: never duplicated."""
    from mlflow.entities import Metric

    c = Retrying(client(uri))
    exp = ensure_experiment(c, experiment)
    found = c.search_runs([exp], filter_string=f"tags.`p2sweep.baseline` = '{b['name']}' and "
                                               f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = create_run_once(c, exp, f"baseline {b['name']}", {
        "mlflow.parentRunId": parent_id, ROLE: "baseline", "p2sweep.baseline": b["name"]},
                          ("p2sweep.baseline", "mlflow.parentRunId"))
    rid = run.info.run_id
    log_params(c, rid, {**cfg.flat(), "baseline.checkpoint": b["checkpoint"],
                        "baseline.weights": res.get("weights", "")})
    ts = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in finite_metrics(res).items()])
    c.set_terminated(rid, "FINISHED")
    return rid
