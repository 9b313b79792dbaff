"""Run and resume sweeps on Ray Tune (local Ray on loopback by default, or a cluster with --address)."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile

from p2core.errors import UserError

from . import results as R
from .spec import SweepSpec, parse_sweep


def privacy_env(local: bool) -> None:
    """No usage statistics or telemetry; a local Ray uses 127.0.0.1 for everything (set before importing ray)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def is_uri(storage: str) -> bool:
    return "://" in storage


def init_ray(address: str | None):
    address = address or os.environ.get("RAY_ADDRESS")
    privacy_env(local=not address)
    import ray

    if ray.is_initialized():
        return
    if address:
        token = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
        if os.path.exists(token) and not os.environ.get("RAY_AUTH_MODE"):
            os.environ["RAY_AUTH_MODE"] = "token"  # as a local ray.init() would; the driver needs it to attach
        try:
            ray.init(address=address, logging_level="WARNING")
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            hint = (" (the cluster uses token authentication: copy its ~/.ray/auth_token here and set "
                    "RAY_AUTH_MODE=token)") if "auth" in msg.lower() or "token" in msg.lower() else ""
            raise UserError(f"--address {address}: cannot attach to the Ray cluster: {msg}{hint}") from None
    else:
        ray.init(include_dashboard=False, logging_level="WARNING", configure_logging=True)


def tracking_uri(spec_uri: str, storage: str) -> str:
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if is_uri(storage):
        raise UserError("tracking.mlflow_uri: required with object storage (e.g. http://mlflow-host:5000); "
                        "the default SQLite database lives only on a local or shared filesystem")
    return "sqlite:///" + os.path.join(os.path.abspath(storage), "mlflow.db")


def resolve_paths(spec: SweepSpec, storage: str) -> dict:
    if is_uri(storage):
        missing = [k for k, v in (("tracking.mlflow_uri", spec.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")),
                                  ("tracking.cache_dir", spec.cache_dir)) if not v]
        if spec.algorithm == "optuna" and not spec.optuna_storage:
            missing.append("tracking.optuna_storage")
        if missing:
            raise UserError(f"storage {storage} is object storage: set {', '.join(missing)} explicitly "
                            "(a tracking server, a cache directory present on every node, an Optuna database URL)")
    root = storage if is_uri(storage) else os.path.abspath(storage)
    return {"storage": root, "mlflow_uri": tracking_uri(spec.mlflow_uri, root),
            "optuna_storage": spec.optuna_storage or ("sqlite:///" + os.path.join(root, "optuna.db")),
            "cache_dir": spec.cache_dir or os.path.join(root, "cache")}


def atomic_json(path: str, obj) -> None:
    from p2core.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def provenance() -> dict:
    import subprocess

    import mlflow
    import ray
    import torch

    import p2core

    out = {"version.torch": torch.__version__, "version.ray": ray.__version__, "version.mlflow": mlflow.__version__,
           "version.p2sweep": p2core.__version__}
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out["git_commit"] = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=5).stdout.strip() or "none"
    except Exception:
        out["git_commit"] = "none"
    return out


def build_trainable(spec: SweepSpec, paths: dict):
    from ray import tune

    from .trainable import run_trial

    info = {"metric": spec.metric, "rungs": spec.rungs(), "cpu": spec.cpu, "cache_dir": paths["cache_dir"]}
    fn = tune.with_parameters(run_trial, base=spec.base, info=info)
    res = {"cpu": spec.cpu}
    if spec.gpu:
        res["gpu"] = spec.gpu
    return tune.with_resources(fn, res)


def param_space(spec: SweepSpec) -> dict:
    from ray import tune

    space = {}
    for key, (kind, vals) in spec.space.items():
        space[key] = {"grid": lambda v: tune.grid_search(v), "choice": tune.choice,
                      "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                      "randint": lambda v: tune.randint(v[0], v[1] + 1)}[kind](vals)
    if len(spec.seeds) > 1:
        space["train.seed"] = tune.grid_search(spec.seeds)
    else:
        space["train.seed"] = spec.seeds[0]
    return space


def make_scheduler(spec: SweepSpec, d: str):
    from ray.tune.schedulers import ASHAScheduler

    class P2ASHA(ASHAScheduler):
        """ASHA that rebuilds its rung records from the experiment's results on resume (Ray does not save them)."""

        def __init__(self, history_dir, metric_name, **kw):
            super().__init__(**kw)
            self._history_dir, self._metric_name, self._seeded = history_dir, metric_name, False

        def _seed(self):
            if self._seeded:
                return
            self._seeded = True

            class Stub:
                def __init__(self, tid):
                    self.trial_id = tid

            for tid, imgs, val in R.rung_history(self._history_dir, self._metric_name):
                self._brackets[0].on_result(Stub(tid), imgs, self._metric_op * val)

        def on_trial_add(self, tc, trial):
            self._seed()
            return super().on_trial_add(tc, trial)

        def on_trial_result(self, tc, trial, result):
            self._seed()
            if trial.trial_id not in self._trial_info:
                self._trial_info[trial.trial_id] = self._brackets[0]
            return super().on_trial_result(tc, trial, result)

        def on_trial_complete(self, tc, trial, result):
            if trial.trial_id not in self._trial_info:
                self._trial_info[trial.trial_id] = self._brackets[0]
            return super().on_trial_complete(tc, trial, result)

    if spec.scheduler != "asha":
        return None
    return P2ASHA(d, spec.metric, time_attr="images_seen", metric=spec.metric, mode="min", max_t=spec.max_images,
                  grace_period=spec.grace_period_images, reduction_factor=spec.reduction_factor, brackets=1)


def make_searcher(spec: SweepSpec, paths: dict, name: str):
    if spec.algorithm != "optuna":
        return None
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    max_images = spec.max_images

    class P2OptunaSearch(OptunaSearch):
        """Trials that ASHA stopped early are told to Optuna as PRUNED (their rung values stay as intermediate
        values), not as COMPLETE with a partial value, so TPE does not mistake short training for a result."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            if result and not error and not result.get("diverged") and result.get("images_seen", 0) < max_images:
                result = {k: v for k, v in result.items() if k != self.metric}
            return super().on_trial_complete(trial_id, result, error)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(paths["optuna_storage"])
    s = P2OptunaSearch(metric=spec.metric, mode="min", sampler=optuna.samplers.TPESampler(seed=spec.search_seed),
                       study_name=name, storage=storage)
    return ConcurrencyLimiter(s, max_concurrent=spec.max_concurrent or 2)


def precompute_reference(spec: SweepSpec, paths: dict) -> None:
    """Build the reference statistics once in the driver with all its CPUs, before trials start and wait on it."""
    import torch

    from p2core.data import load_dataset
    from p2core.evaluation import get_extractor, reference_stats

    cfg = spec.base_config()
    imgs, key = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels)
    ext = get_extractor(cfg.eval.extractor, cfg.eval.inception_path, cfg.eval.allow_download)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"reference statistics: {cfg.eval.ref_samples or len(imgs)} training images, {ext.name} "
          f"(cached in {paths['cache_dir']})", file=sys.stderr)
    reference_stats(imgs, key, ext, image_size=cfg.model.image_size, ref_samples=cfg.eval.ref_samples,
                    cache_dir=paths["cache_dir"], progress=True)


def run(spec: SweepSpec, name: str, storage: str, address: str | None, time_budget_s: float | None,
        spec_dir: str = ".") -> int:
    paths = resolve_paths(spec, storage)
    d = os.path.join(paths["storage"], name)
    if os.path.exists(os.path.join(d, R.META)):
        raise UserError(f"sweep {name!r} already exists in {paths['storage']}: `p2sweep resume {name}` continues it, "
                        "--name starts another")
    local = not (address or os.environ.get("RAY_ADDRESS"))
    privacy_env(local)
    if local and not is_uri(storage):
        precompute_reference(spec, paths)
    from .tracking import client, ensure_experiment

    c = client(paths["mlflow_uri"])
    exp = ensure_experiment(c, name)
    parent = c.create_run(exp, run_name=f"{name} (sweep)", tags={"p2sweep.role": "sweep", "p2sweep.sweep": name})
    pid = parent.info.run_id
    from mlflow.entities import Param

    params = {"sweep.metric": spec.metric, "sweep.algorithm": spec.algorithm, "sweep.scheduler": spec.scheduler,
              "sweep.seeds": str(spec.seeds), "sweep.max_images": spec.max_images, **provenance()}
    c.log_batch(pid, params=[Param(k, str(v)) for k, v in params.items()])
    c.log_text(pid, spec.source_yaml, "sweep.yaml")
    meta = {"name": name, "metric": spec.metric, "max_images": spec.max_images, "base": spec.base,
            "source_yaml": spec.source_yaml, "paths": paths, "parent_run_id": pid, "experiment": name,
            "address": address, "sweep_dir": spec_dir, "raw": spec.raw}
    atomic_json(os.path.join(d, R.META), meta)
    run_baselines(spec, meta)
    return _fit(spec, meta, address, time_budget_s, restore=False)


def run_baselines(spec: SweepSpec, meta: dict) -> None:
    if not spec.baselines:
        return
    from .baselines import evaluate
    from .tracking import log_baseline

    paths = meta["paths"]
    d = os.path.join(paths["storage"], meta["name"])
    evaluate(spec.baselines, spec.base, d, paths["cache_dir"],
             tracker=lambda b, cfg, res: log_baseline(paths["mlflow_uri"], meta["experiment"],
                                                      meta["parent_run_id"], b, cfg, res))


def resume(name: str, storage: str | None, address: str | None, time_budget_s: float | None) -> int:
    import yaml

    meta = R.load_meta(name, storage)
    d = os.path.join(meta["paths"]["storage"], name)
    if not os.path.exists(os.path.join(d, "tuner.pkl")):
        raise UserError(f"sweep {name!r} has no Ray Tune state to resume in {d}")
    raw = dict(meta.get("raw") or yaml.safe_load(meta["source_yaml"]))
    raw.pop("overrides", None)  # already applied to the stored base
    spec = parse_sweep(raw | {"base": meta["base"], "name": name}, meta.get("sweep_dir", d))
    spec.source_yaml = meta["source_yaml"]
    privacy_env(local=not (address or os.environ.get("RAY_ADDRESS")))
    from .tracking import client

    client(meta["paths"]["mlflow_uri"]).update_run(meta["parent_run_id"], status="RUNNING")
    run_baselines(spec, meta)  # those already evaluated are skipped
    return _fit(spec, meta, address, time_budget_s, restore=True)


def _fit(spec: SweepSpec, meta: dict, address, time_budget_s, restore: bool) -> int:
    paths, name = meta["paths"], meta["name"]
    d = os.path.join(paths["storage"], name)
    init_ray(address)
    from ray import tune

    from .tracking import MLflowTracker

    trainable = build_trainable(spec, paths)
    if restore:
        tuner = tune.Tuner.restore(d, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tracker = MLflowTracker(paths["mlflow_uri"], meta["experiment"], meta["parent_run_id"],
                                spec.base_config().flat(), spec.metric, spec.max_images, name)
        searcher = make_searcher(spec, paths, name)
        limit = None if searcher is not None else (spec.max_concurrent or None)  # Optuna: its ConcurrencyLimiter
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec),
            tune_config=tune.TuneConfig(num_samples=spec.num_samples, search_alg=searcher,
                                        scheduler=make_scheduler(spec, d), max_concurrent_trials=limit,
                                        reuse_actors=False),
            run_config=tune.RunConfig(name=name, storage_path=paths["storage"], callbacks=[tracker],
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1))
    interrupted = False
    budget = {"hit": False}
    timer = None
    if time_budget_s:
        # The budget acts like Ctrl-C (Tune saves the experiment with its trials unfinished, so `resume` continues
        # them); Tune's own time_budget_s would end the trials instead.
        import signal
        import threading

        def budget_hit():
            print(f"time budget of {time_budget_s:.0f} s reached: stopping the sweep (resumable)", file=sys.stderr)
            budget["hit"] = True
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Timer(time_budget_s, budget_hit)
        timer.daemon = True
        timer.start()
    try:
        tuner.fit()  # on Ctrl-C Tune saves the experiment and returns; the states are read back below
    except KeyboardInterrupt:  # a second Ctrl-C
        interrupted = True
    finally:
        if timer is not None:
            timer.cancel()
    states = trial_states(d)
    if states:
        atomic_json(os.path.join(d, R.STATES), states)
    interrupted = interrupted or any(v["state"] in UNFINISHED for v in states.values())
    finish(meta, interrupted)
    trials = R.load_trials(d, spec.metric, spec.max_images)
    header, rows = R.status_rows(trials, spec.metric)
    from .commands import format_table

    print(format_table(header, rows))
    if interrupted:
        print(f"sweep {name} stopped; continue it with: p2sweep resume {name} --storage {paths['storage']}")
    print(f"results: p2sweep status {name} --storage {paths['storage']}; "
          f"UI: p2sweep ui {name} --storage {paths['storage']}")
    return 130 if interrupted and not budget["hit"] else 0


UNFINISHED = ("RUNNING", "PENDING", "PAUSED")


def trial_states(d: str) -> dict:
    """{trial_id: {state, diverged, images_seen}} from the experiment state Tune saved last (before it tears its
    trials down, so an interrupted trial is still RUNNING there). States: TERMINATED (trained to the end), STOPPED
    (ended early by ASHA), DIVERGED, ERROR, or RUNNING/PENDING/PAUSED (interrupted: `resume` continues it)."""
    import glob

    files = sorted(glob.glob(os.path.join(d, "experiment_state-*.json")))  # named by session start time
    if not files:
        return {}
    with open(files[-1]) as f:
        data = json.load(f)
    out = {}
    for item in data.get("trial_data", []):
        tr, meta = (json.loads(x) if isinstance(x, str) else x for x in item)
        m = meta.get("last_result") or {}
        st = tr.get("status", "PENDING")
        if st == "TERMINATED":
            st = "DIVERGED" if m.get("diverged") else "TERMINATED" if m.get("final") else "STOPPED"
        out[tr["trial_id"]] = {"state": st, "diverged": bool(m.get("diverged")),
                               "images_seen": int(m.get("images_seen", 0))}
    return out


def finish(meta: dict, interrupted: bool = False) -> None:
    """Close runs left RUNNING, then put the results table and metric-vs-images plot on the parent run."""
    from .tracking import client, reconcile

    paths, name = meta["paths"], meta["name"]
    d = os.path.join(paths["storage"], name)
    trials = R.load_trials(d, meta["metric"], meta["max_images"])
    reconcile(paths["mlflow_uri"], meta["experiment"], meta["parent_run_id"],
              {t["trial_id"]: t for t in trials}, meta["max_images"])
    c = client(paths["mlflow_uri"])
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = os.path.join(tmp, "results.csv")
        write_csv(csv_path, trials, meta["metric"])
        c.log_artifact(meta["parent_run_id"], csv_path)
        png = plot_history(os.path.join(tmp, "metric_vs_images.png"), {name: trials}, meta["metric"])
        if png:
            c.log_artifact(meta["parent_run_id"], png)
    # An interrupted sweep (Ctrl-C, --time-budget) is KILLED until `p2sweep resume` reopens it.
    c.set_terminated(meta["parent_run_id"], "KILLED" if interrupted else "FINISHED")


def write_csv(path: str, trials: list[dict], metric: str) -> None:
    import csv

    keys = sorted({k for t in trials for k in t["config"]})
    evals = sorted({k for t in trials for k in t["evals"]})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", *keys, "state", "images_seen", f"best_{metric}", *evals])
        for t in trials:
            w.writerow([t["trial_id"], *[t["config"].get(k, "") for k in keys], t["state"], t["images_seen"],
                        t["best"] if t["best"] is not None else "", *[t["evals"].get(k, "") for k in evals]])


def plot_history(path: str, sweeps: dict, metric: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    any_line = False
    for sname, trials in sweeps.items():
        for t in trials:
            pts = [(i, v) for i, v in t["history"] if v is not None and math.isfinite(v)]
            if pts:
                cfg = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in t["config"].items() if k != "train.seed")
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"{sname}: {cfg}"[:70])
                any_line = True
    if not any_line:
        plt.close(fig)
        return None
    ax.set_xlabel("images seen")
    ax.set_ylabel(metric)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
