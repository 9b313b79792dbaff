"""Run and resume sweeps on Ray Tune: builds the Tuner from a SweepSpec, runs it, closes the books.

Nothing is written for a sweep until it can start: Ray attached, the Optuna storage opened, the reference
statistics built, the baselines evaluated. A failure or Ctrl-C before that removes what this run created (the
MLflow parent run, the Optuna study, the experiment folder), so the same `run` can simply be repeated.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile

from p2core.errors import UserError

from .. import compat
from . import ray_env
from ..results import trials as R
from ..storage import fs as S
from ..storage import layout as L
from ..storage import tune_state
from ..record.meta import META, STATES, VERSION, Paths, SweepMeta, load_meta, storage_root, validate_name
from ..record.spec import SweepSpec


def tracking_uri(spec_uri: str, storage: str) -> str:
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if S.is_uri(storage):
        raise UserError(f"--storage {storage}: an object-storage sweep needs an MLflow tracking server (SQLite "
                        "cannot live in a bucket): set tracking.mlflow_uri in the sweep file or MLFLOW_TRACKING_URI")
    return L.mlflow_db_uri(os.path.abspath(storage))


def resolve_paths(spec: SweepSpec, storage: str) -> Paths:
    """Where the sweep's parts live. A path storage holds everything (SQLite stores, reference statistics); an
    object storage holds Tune's state, the trials, p2sweep's files and the reference statistics, while MLflow and
    Optuna need servers (databases do not live in buckets)."""
    from ..record.spec import has_credentials

    root = storage_root(storage)
    tr = spec.tracking
    env_uri = "" if tr.mlflow_uri else os.environ.get("MLFLOW_TRACKING_URI", "")  # the one written to p2sweep.json
    for what, v in (("--storage", root), ("MLFLOW_TRACKING_URI", env_uri)):
        if has_credentials(v):
            raise UserError(f"{what}: a URL with a password in it would be written to p2sweep.json; use "
                            "the service's own variables (AWS_*, MLFLOW_TRACKING_USERNAME/PASSWORD)")
    if S.is_uri(root):
        S.resolve(root)  # a URI without a bucket, an unknown scheme: say so now
        if spec.search.algorithm == "optuna" and not tr.optuna_storage:
            raise UserError(f"--storage {root}: an Optuna sweep on object storage needs tracking.optuna_storage (a "
                            "database URL every node and resume can reach, e.g. postgresql://...)")
        return Paths(storage=root, mlflow_uri=tracking_uri(tr.mlflow_uri, root),
                     optuna_storage=tr.optuna_storage, cache_dir=tr.cache_dir or S.join(root, L.CACHE))
    return Paths(storage=root, mlflow_uri=tracking_uri(tr.mlflow_uri, root),
                 optuna_storage=tr.optuna_storage or L.optuna_db_uri(root),
                 cache_dir=tr.cache_dir or os.path.join(root, L.CACHE))


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


def precompute_reference(spec: SweepSpec, paths: Paths, address: str | None) -> dict:
    """The reference statistics, once per sweep, as a Ray task before the trials start (trials then read them from
    the cache or, for object storage, copy them from it)."""
    from .driver_tasks import reference_as_task

    out = reference_as_task(spec.base, paths.cache_dir, spec.resources.cpu, spec.resources.gpu,
                            whole_node=_local(address))
    gpus = f" on GPU {out['gpus']}" if out.get("gpus") else ""
    print(f"reference statistics: {'computed' if out['computed'] else 'found in ' + out['path']}{gpus} in "
          f"{out['wall_seconds']:.1f} s", file=sys.stderr)
    return out


def _local(address: str | None) -> bool:
    """The sweep runs on a local Ray that p2sweep starts itself (nobody else's work shares it)."""
    return ray_env.resolve_address(address) is None


def start_ray(spec: SweepSpec, address: str | None, worker_env: dict | None = None) -> None:
    """Start or attach Ray, then check that one trial fits on some node (Ray would let it pend for ever)."""
    ray_env.init_ray(address, worker_env)
    ray_env.check_fits(spec.resources.cpu, spec.resources.gpu, attached=not _local(address))


# -- building the Tuner -------------------------------------------------------------------------------------------

def build_trainable(spec: SweepSpec, paths: Paths, ref_file: str = ""):
    from ray import tune

    from .trainable import TrialInfo, run_trial

    # a cache in object storage: each node keeps its own local cache and copies the reference statistics into it
    local = not S.is_uri(paths.cache_dir)
    info = TrialInfo(metric=spec.metric, rungs=spec.rungs(), rung_metrics=spec.rung_metric_map(),
                     cpu=spec.resources.cpu,
                     ema_rule=spec.scheduler.ema_rule,
                     cache_dir=paths.cache_dir if local else "", ref_file="" if local else ref_file)
    fn = tune.with_parameters(run_trial, base=spec.base, info=info)
    res = {"cpu": spec.resources.cpu}
    if spec.resources.gpu:
        res["gpu"] = spec.resources.gpu
    return tune.with_resources(fn, res)


def make_searcher(spec: SweepSpec, meta: SweepMeta):
    from .schedulers import GroupSearcher

    # Optuna: TPE learns little from configurations asked all at once, so a default of two at a time (x seeds)
    limit = spec.search.max_concurrent or (2 * len(spec.seeds) if spec.search.algorithm == "optuna" else 0)
    return GroupSearcher(spec.space, spec.search.algorithm, spec.search.num_samples, spec.seeds, spec.metric,
                         search_seed=spec.search.seed, optuna_url=meta.paths.optuna_storage,
                         study_name=meta.study_name, sweep_id=meta.sweep_id, max_concurrent=limit)


def make_scheduler(spec: SweepSpec, exp_dir: str):
    if spec.scheduler.type != "asha":
        return None
    from .schedulers import GroupASHA

    return GroupASHA(spec.metric, spec.milestones(), spec.scheduler.reduction_factor, len(spec.seeds),
                     history=functools.partial(R.rung_history, exp_dir, spec.metric))


def trial_name(trial) -> str:
    """`g<group>s<seed>-<trial id>`: which configuration and seed a trial is, in Tune's tables and folder names."""
    from ..record.replicate import Replicate

    group, seed = Replicate.of(trial.config).shown
    return f"g{group}s{seed}-{trial.trial_id}"


def quiet_console(verbose: bool) -> None:
    from . import console

    console.quiet_tune(verbose)


def console_callbacks(spec: SweepSpec, verbose: bool) -> list:
    """Tune's JSON/CSV loggers (result.json is read back) and, unless --verbose, the sweep's own console."""
    from . import console

    if verbose:
        return console.loggers()
    console.decision_log()
    return console.loggers() + [console.SweepConsole(spec.metric, spec.max_images, sorted(spec.space),
                                                      milestones=spec.milestones())]


def new_tuner(spec: SweepSpec, meta: SweepMeta, ref_file: str, verbose: bool = False):
    from ray import tune

    from ..record.trial_report import SCORE
    from ..tracking.callback import MLflowTracker

    tracker = MLflowTracker(meta.paths.mlflow_uri, meta.experiment, meta.parent_run_id, meta.base_config().flat(),
                            spec.metric, spec.max_images, meta.name, meta.dir)
    extra = console_callbacks(spec, verbose)
    storage_path, fs = S.ray_storage(meta.paths.storage)
    return tune.Tuner(
        build_trainable(spec, meta.paths, ref_file), param_space={},
        tune_config=tune.TuneConfig(num_samples=spec.num_trials(), search_alg=make_searcher(spec, meta),
                                    scheduler=make_scheduler(spec, meta.dir),
                                    reuse_actors=False, trial_name_creator=trial_name,
                                    trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=meta.name, storage_path=storage_path, storage_filesystem=fs, callbacks=[tracker, *extra],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # the trial's own files (p2/: metrics.jsonl, sample grids, loss.png) reach the storage from any node, at
            # every reported checkpoint; without it they stay in the node's /tmp/ray session
            sync_config=tune.SyncConfig(sync_artifacts=True),
            # the best checkpoint by the sweep metric and the latest (Tune always keeps the latest)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE,
                                                    checkpoint_score_order="min"),
            verbose=1 if verbose else 0))


# -- run / resume ---------------------------------------------------------------------------------------------------

def run(spec: SweepSpec, name: str, storage: str, address: str | None, time_budget_s: float | None,
        spec_dir: str = ".", verbose: bool = False) -> int:
    validate_name(name)
    ray_env.prepare(address)  # before anything imports Ray (the console does)
    tune_state.pin_utc()  # before Tune names its state files by the driver's local time
    quiet_console(verbose)
    worker_env = ray_env.storage_env(spec.tracking.s3_endpoint_url, spec.tracking.s3_region)
    paths = resolve_paths(spec, storage)
    d = S.join(paths.storage, name)
    if S.exists(S.join(d, META)):
        raise UserError(f"sweep {name!r} already exists in {paths.storage}: `p2sweep resume {name}` continues it, "
                        "--name starts another")
    from ..tracking.client import probe_tracking

    probe_tracking(paths.mlflow_uri)  # a tracking server that does not answer fails here, before anything is written
    if not S.is_uri(paths.storage):
        os.makedirs(paths.storage, exist_ok=True)  # the default SQLite files live in it
    sweep_id = SweepMeta.new_id()
    meta = SweepMeta(name=name, sweep_id=sweep_id, spec=dataclasses.replace(spec, name=name), paths=paths,
                     parent_run_id="", experiment=name, sweep_dir=spec_dir, address=address)
    created_dir = not S.exists(d)
    study = None
    c = None
    try:
        if spec.search.algorithm == "optuna":  # a bad Optuna URL fails here
            from .schedulers import open_study

            study = open_study(paths.optuna_storage, meta.study_name, sweep_id, create=True)
        start_ray(spec, address, worker_env)  # an --address that cannot be attached, a trial that fits nowhere
        ref = precompute_reference(spec, paths, address)
        from mlflow.entities import Param

        from ..tracking.client import Retrying, client
        from ..tracking.runs import create_run_once, ensure_experiment

        c = Retrying(client(paths.mlflow_uri))
        exp = ensure_experiment(c, name)
        parent = create_run_once(c, exp, f"{name} (sweep)", {"p2sweep.role": "sweep", "p2sweep.sweep": name,
                                                             "p2sweep.sweep_id": sweep_id}, "p2sweep.sweep_id")
        meta.parent_run_id = parent.info.run_id
        params = {"sweep.metric": spec.metric, "sweep.algorithm": spec.search.algorithm,
                  "sweep.scheduler": spec.scheduler.type,
                  "sweep.seeds": str(spec.seeds), "sweep.max_images": spec.max_images, "sweep.id": sweep_id,
                  "sweep.rung_metrics": str(spec.rung_metric_map() or "-"), "sweep.ema_rule": spec.scheduler.ema_rule,
                  "reference.computed": ref["computed"], "reference.task_seconds": round(ref["wall_seconds"], 1),
                  **provenance()}
        c.log_batch(meta.parent_run_id, params=[Param(k, str(v)) for k, v in params.items()])
        c.log_text(meta.parent_run_id, spec.source_yaml, "sweep.yaml")
        run_baselines(spec, meta, ref["path"], address)
        meta.save()
    except BaseException:
        _undo_start(meta, c, study, created_dir)
        raise
    return _fit(spec, meta, address, time_budget_s, restore=False, ref_file=ref["path"], verbose=verbose)


def _undo_start(meta: SweepMeta, c, study, created_dir: bool) -> None:
    """A sweep that never started leaves nothing behind: `run` can be repeated as it was."""
    try:
        if c is not None and meta.parent_run_id:
            c.set_terminated(meta.parent_run_id, "KILLED")
            c.delete_run(meta.parent_run_id)
        if study is not None:
            import optuna

            optuna.delete_study(study_name=meta.study_name, storage=meta.paths.optuna_storage)
    except Exception as e:  # the original error matters more
        print(f"p2sweep: could not clean up the MLflow run/Optuna study of the failed start: {e}", file=sys.stderr)
    try:
        if created_dir and S.isdir(meta.dir) and not S.exists(S.join(meta.dir, META)):
            S.remove_tree(meta.dir)
    except Exception as e:
        print(f"p2sweep: could not remove {meta.dir} of the failed start: {e}", file=sys.stderr)


def run_baselines(spec: SweepSpec, meta: SweepMeta, ref_file: str, address: str | None = None) -> None:
    if not spec.baselines:
        return
    from ..record import baselines
    from .driver_tasks import baseline_runner
    from ..tracking.runs import log_baseline

    p = meta.paths
    baselines.evaluate(spec.baselines, spec.base, meta.dir, p.cache_dir,
                       tracker=lambda b, cfg, res: log_baseline(p.mlflow_uri, meta.experiment, meta.parent_run_id, b,
                                                                cfg, res),
                       run=baseline_runner(spec.base, p.cache_dir, ref_file, spec.resources.cpu, spec.resources.gpu,
                                           whole_node=_local(address)))


def resume(name: str, storage: str | None, address: str | None, time_budget_s: float | None,
           retry_errored: bool = False, verbose: bool = False) -> int:
    meta = load_meta(name, storage)
    ray_env.prepare(address)  # before anything imports Ray (the console does)
    tune_state.pin_utc()
    quiet_console(verbose)
    spec = meta.spec
    worker_env = ray_env.storage_env(spec.tracking.s3_endpoint_url, spec.tracking.s3_region)
    # Ray attached and a trial's fit checked before anything is written (the store re-rooted, the run RUNNING)
    start_ray(spec, address, worker_env)
    from ..tracking.repair import follow_move

    follow_move(meta)
    if meta.read_version < VERSION:  # a sweep of an older p2sweep: from now on its record is read, not re-parsed
        meta.save()
    if spec.search.algorithm == "optuna":
        from .schedulers import open_study

        open_study(meta.paths.optuna_storage, meta.study_name, meta.sweep_id, create=False)
    from ..tracking.client import Retrying, client

    try:
        Retrying(client(meta.paths.mlflow_uri)).update_run(meta.parent_run_id, status="RUNNING")
    except Exception as e:  # MLflow never stops a sweep: `finish` closes the books when it is back
        print(f"p2sweep: MLflow is not reachable ({str(e).splitlines()[0][:200]}); resuming without it",
              file=sys.stderr)
    # the statistics the sweep computed are found again (in the storage or the shared cache), not recomputed
    ref = precompute_reference(spec, meta.paths, address)
    run_baselines(spec, meta, ref["path"], address)  # those already evaluated are skipped
    # Tune's tuner.pkl exists from the start, its experiment state only after the first save: without it (the
    # driver died within seconds) Tune's restore would quietly start a one-trial experiment, so start afresh
    # the same when the first save reached the storage only in part (Tune's restore would run the saved trials and
    # create no others without its searcher state, or start afresh without the searcher's own file)
    restore = all(S.glob(meta.dir, pattern) for pattern in compat.STATE_PATTERNS)
    if not restore and S.glob(meta.dir, compat.EXPERIMENT_STATE):
        print("p2sweep: Tune's first state save is incomplete in the storage (no searcher state): the sweep's "
              "trials start afresh", file=sys.stderr)
    return _fit(spec, meta, address, time_budget_s, restore=restore, retry_errored=retry_errored,
                ref_file=ref["path"], verbose=verbose)


def repoint_restored(tuner, spec: SweepSpec, meta: SweepMeta, verbose: bool = False,
                     retry_errored: bool = False) -> None:
    """A restored Tuner brings back the tracker, scheduler and searcher pickled in `tuner.pkl` when the sweep started,
    with the paths of that time: point them at where the sweep is now (a moved or copied storage writes its own
    MLflow and Optuna stores, rebuilds ASHA from its own results and puts new trials in its own folder)."""
    from ray.tune.search import SearchGenerator

    from .schedulers import GroupASHA, GroupSearcher, RootedSearchGenerator
    from ..tracking.callback import MLflowTracker

    inner = compat.tuner_internal(tuner)  # Tuner -> TunerInternal (configs as restored)
    if inner is None:
        raise UserError("resume through a Ray Client address (ray://) is not supported: run the driver on the "
                        "cluster (`ray job submit -- p2sweep resume ...`) or attach with HOST:PORT")
    from .console import SweepConsole, with_loggers

    rc, tc = compat.restored_configs(inner)
    for cb in rc.callbacks or []:
        if isinstance(cb, MLflowTracker):
            cb.uri, cb.exp_dir, cb._runs = meta.paths.mlflow_uri, meta.dir, None
    # this command's console (--verbose or not), not the one pickled when the sweep started
    kept = [cb for cb in rc.callbacks or [] if not isinstance(cb, SweepConsole)]
    rc.callbacks = with_loggers(kept) + [cb for cb in console_callbacks(spec, verbose)
                                         if isinstance(cb, SweepConsole)]
    rc.verbose = 1 if verbose else 0
    if isinstance(tc.scheduler, GroupASHA):
        tc.scheduler.history = functools.partial(R.rung_history, meta.dir, spec.metric)
    searcher = tc.search_alg.searcher if isinstance(tc.search_alg, SearchGenerator) else tc.search_alg
    if isinstance(searcher, GroupSearcher):
        searcher.optuna_url, searcher._study = meta.paths.optuna_storage, None
        tc.search_alg = RootedSearchGenerator(searcher, *S.ray_storage(meta.paths.storage),
                                              restored=R.saved_trials(meta.dir), retry_errored=retry_errored)


def _fit(spec: SweepSpec, meta: SweepMeta, address, time_budget_s, restore: bool, retry_errored: bool = False,
         ref_file: str = "", verbose: bool = False) -> int:
    ray_env.init_ray(address)
    from ray import tune

    compat.check_versions()
    if restore:
        # ERROR trials stay errored unless asked: Tune keeps their failure count, so retrying on every resume would
        # rerun a configuration that fails (out of memory, say) once per --time-budget slice
        moved = tune_state.set_aside_stale(meta.dir)
        if moved:
            print(f"p2sweep: {len(moved)} Tune state file(s) named later than the newest session (another clock or "
                  f"time zone) moved to {tune_state.STALE}/", file=sys.stderr)
        path, fs = S.ray_storage(meta.dir)
        tuner = tune.Tuner.restore(path, build_trainable(spec, meta.paths, ref_file), resume_unfinished=True,
                                   resume_errored=retry_errored, restart_errored=False, storage_filesystem=fs)
        repoint_restored(tuner, spec, meta, verbose, retry_errored)
    else:
        tuner = new_tuner(spec, meta, ref_file, verbose)
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
    states = R.tune_states(meta.dir)
    if states:
        import json

        S.write_text(S.join(meta.dir, STATES), json.dumps(states, indent=1, default=str))
    interrupted = interrupted or any(v["state"] in R.UNFINISHED for v in states.values())
    trials = finish(meta, interrupted)
    from ..results.table import format_table

    print(format_table(*R.status_rows(trials, spec.metric)))
    p = meta.paths.storage
    if interrupted:
        print(f"sweep {meta.name} stopped; continue it with: p2sweep resume {meta.name} --storage {p}")
    print(f"results: p2sweep status {meta.name} --storage {p}; UI: p2sweep ui {meta.name} --storage {p}")
    return 130 if interrupted and not budget["hit"] else 0


def finish(meta: SweepMeta, interrupted: bool = False) -> list:
    """Write what MLflow missed, close runs left RUNNING, then put the results table and the metric-vs-images plot
    on the parent run. Returns the sweep's trials (results.Trial)."""
    from ..results.plots import plot_history
    from ..tracking.client import Retrying, client
    from ..tracking.repair import backfill_artifacts, reconcile, write_pending
    from ..tracking.view import set_sweep_view

    trials = R.load_trials(meta.dir, meta.metric, meta.spec.milestones())
    states = R.known_states(meta.dir)
    try:
        left = write_pending(meta.paths.mlflow_uri, meta.experiment, meta.parent_run_id,
                             meta.base_config().flat(), meta.name, meta.dir,
                             {t.trial_id: t.dir for t in trials})
        reconcile(meta.paths.mlflow_uri, meta.experiment, meta.parent_run_id, states, meta.max_images)
        try:
            backfill_artifacts(meta.paths.mlflow_uri, meta.experiment, meta.parent_run_id, trials)
        except Exception as e:  # the results table and the run's state matter more than late files
            print(f"p2sweep: some trial files were not logged to MLflow ({str(e).splitlines()[0][:200]})",
                  file=sys.stderr)
        c = Retrying(client(meta.paths.mlflow_uri))
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = os.path.join(tmp, "results.csv")
            R.write_csv(csv_path, trials, meta.metric)
            c.log_artifact(meta.parent_run_id, csv_path)
            png = plot_history(os.path.join(tmp, "metric_vs_images.png"), {meta.name: trials}, meta.metric)
            if png:
                c.log_artifact(meta.parent_run_id, png)
        exp = c.get_experiment_by_name(meta.experiment)
        if exp is not None:  # the comparison view that `p2sweep ui` opens, also for a tracking server's own UI
            try:
                set_sweep_view(c, exp.experiment_id, meta, trials)
            except Exception as e:  # the run's state matters more than the view
                print(f"p2sweep: the MLflow comparison view was not written ({str(e).splitlines()[0][:200]})",
                      file=sys.stderr)
        # An interrupted sweep (Ctrl-C, --time-budget) is KILLED until `p2sweep resume` reopens it.
        c.set_terminated(meta.parent_run_id, "KILLED" if interrupted or left else "FINISHED")
    except Exception as e:  # the sweep's results are safe in the storage; MLflow catches up on the next resume
        print(f"p2sweep: MLflow could not be updated ({str(e).splitlines()[0][:200]}); run `p2sweep resume "
              f"{meta.name}` later to write it", file=sys.stderr)
    return trials
