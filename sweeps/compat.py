"""Every place p2sweep relies on a private or undocumented part of Ray Tune 2.60, Optuna 5 or MLflow 3.17, each
behind one small name here with a one-line note of what it relies on (the library file), and each guarded by a test
in tests/test_compat.py that fails when that part changes. `check_versions` warns when the installed versions differ
from the tested ones. Nothing here imports another sweeps module, and no library is imported at module level (the
results reader, the Tune-state reader and the trial reports import this module without Ray).

Known touches kept elsewhere:
- sweeps/tune/trainable.py `run_trial` quiets the logger `ray.train._internal.storage` (`RAY_STORAGE_LOGGER` here names
  it) and `trial_working_dir` reads `tune.get_context().get_storage().trial_working_directory` (a Ray DeveloperAPI,
  checked by tests/test_ray_trust.py and tests/test_compat.py).
"""
from __future__ import annotations

import json
import re
import warnings

TESTED_RAY = ("2.60.",)
TESTED_OPTUNA = ("5.0.",)


def check_versions() -> None:
    """Warn when Ray or Optuna differ from the versions whose scheduler/searcher protocol this module was tested on."""
    import optuna
    import ray

    for name, have, tested in (("ray", ray.__version__, TESTED_RAY), ("optuna", optuna.__version__, TESTED_OPTUNA)):
        if not have.startswith(tested):
            warnings.warn(f"p2sweep's scheduler/searcher were tested with {name} {tested[0]}x, found {have}",
                          stacklevel=2)


# -- Ray Tune: a restored Tuner ---------------------------------------------------------------------------------------

def tuner_internal(tuner):
    """The TunerInternal behind a Tuner, None through Ray Client (ray/tune/tuner.py: `Tuner._local_tuner`)."""
    return getattr(tuner, "_local_tuner", None)


def restored_configs(inner) -> tuple:
    """(RunConfig, TuneConfig) a restored TunerInternal will run with, the objects themselves: changing them changes
    the run (ray/tune/impl/tuner_internal.py: `get_run_config()` returns `_run_config`; `_tune_config`)."""
    return inner.get_run_config(), inner._tune_config


def reroot_search_generator(gen, storage_fs_path: str, storage_filesystem) -> None:
    """Point the Experiment a restored SearchGenerator brought back at this storage, so trials created from now on
    get their folders there (ray/tune/search/search_generator.py: `_experiment`, restored by `set_state`;
    ray/tune/experiment/experiment.py: the StorageContext in `spec["storage"]` and `.storage`)."""
    import copy

    import pyarrow.fs as pafs

    exp = gen._experiment
    if exp is None or exp.spec.get("storage") is None:
        return
    st = copy.copy(exp.spec["storage"])
    st.storage_filesystem = storage_filesystem or pafs.LocalFileSystem()
    st.storage_fs_path = storage_fs_path
    exp.spec["storage"] = exp.storage = st


# -- Ray Tune: schedulers and searchers -------------------------------------------------------------------------------

PICKLED_METRIC = "_metric"  # where a pickled TrialScheduler/Searcher keeps its metric (see set_declared_metric)


def set_declared_metric(obj, metric: str, mode: str | None = None) -> None:
    """The metric (and mode) a scheduler or searcher declares to Tune, set without `set_search_properties` (which
    refuses a second one): they live in `_metric`/`_mode` (ray/tune/schedulers/trial_scheduler.py TrialScheduler,
    ray/tune/search/searcher.py Searcher; their `metric`/`mode` properties read them)."""
    obj._metric = metric
    if mode is not None:
        obj._mode = mode


def out_of_retries(trial) -> bool:
    """In a scheduler's `on_trial_error`: the trial will not be retried. Relies on Tune counting the failure before
    it tells the scheduler (ray/tune/execution/tune_controller.py `_process_trial_failure`: `trial.handle_error`,
    which adds to `num_failures`, runs before `_scheduler_alg.on_trial_error`)."""
    return not trial.should_recover()


# -- Ray Tune: its saved state (read without Ray) ---------------------------------------------------------------------

# the state files TuneController, SearchGenerator and Searcher write per session (their CKPT_FILE_TMPL)
EXPERIMENT_STATE = "experiment_state-*.json"
STATE_PATTERNS = (EXPERIMENT_STATE, "search_gen_state-*.json", "searcher-state-*.pkl")
# a session's name, `date` in results and the time in error.txt: local wall-clock time, whole seconds
# (ray/tune/execution/tune_controller.py `_session_str`, ray/tune/trainable/trainable.py, ray/tune/utils/util.py
# date_str)
TUNE_DATE = "%Y-%m-%d_%H-%M-%S"
ERROR_FILE = "error.txt"  # a trial's error file (ray/air/constants.py EXPR_ERROR_FILE)
# each failure's header line in it (ray/tune/experiment/trial.py `Trial.handle_error`)
_FAILURE = re.compile(r"^Failure # \d+ \(occurred at (\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\)", re.M)


def state_session(name: str) -> str:
    """`experiment_state-2026-12-02_20-46-35.json` -> `2026-12-02_20-46-35` (any of STATE_PATTERNS), else ""."""
    stem = name.rsplit(".", 1)[0]
    for p in STATE_PATTERNS:
        prefix = p.split("*")[0]
        if stem.startswith(prefix):
            return stem[len(prefix):]
    return ""


def state_start_time(data: dict) -> float:
    """The session's start in epoch seconds an experiment state records, 0.0 when absent (ray/tune/execution/
    tune_controller.py `save_to_dir`: `"stats": {"start_time": time.time()}`). TypeError/ValueError/AttributeError
    for a malformed one."""
    return float(data.get("stats", {}).get("start_time") or 0.0)


def saved_trials(data: dict) -> list[tuple[dict, dict]]:
    """[(trial state, run metadata)] of an experiment state: `trial_data` is a list of the pairs of JSON strings
    `Trial.get_json_state()` returns (ray/tune/execution/tune_controller.py `save_to_dir`; ray/tune/experiment/
    trial.py: trial_id, status, config, relative_logdir; _TrialRunMetadata: last_result, num_failures,
    error_filename)."""
    return [tuple(json.loads(x) if isinstance(x, str) else x for x in item) for item in data.get("trial_data", [])]


def failure_times(text: str) -> list[str]:
    """The TUNE_DATE time of each failure a trial's error file records, in order."""
    return _FAILURE.findall(text or "")


# -- Ray Tune: what it adds to every result ---------------------------------------------------------------------------

TRIAL_ID, DATE, TIMESTAMP = "trial_id", "date", "timestamp"
CHECKPOINT_DIR_NAME = "checkpoint_dir_name"  # the checkpoint a report came with
# the keys Tune fills in (ray/tune/result.py AUTO_RESULT_KEYS and the others it names; ray/tune/trainable/
# trainable.py get_auto_filled_metrics): `date` in TUNE_DATE, `timestamp` in whole epoch seconds
TUNE_RESULT_KEYS = frozenset({
    "training_iteration", "time_this_iter_s", "time_total_s", TIMESTAMP, "pid", "time_since_restore",
    "iterations_since_restore", "done", "node_ip", TRIAL_ID, DATE, "hostname", CHECKPOINT_DIR_NAME,
    "should_checkpoint", "experiment_tag"})


# -- Ray Tune: a trial's folders on the driver ------------------------------------------------------------------------

def trial_working_directory(trial) -> str | None:
    """A trial's working directory in this machine's Ray session, None when it cannot be known here (no storage
    context or trial folder name yet, Ray not started) (ray/tune/experiment/trial.py `Trial.storage`;
    ray/train/_internal/storage.py `StorageContext.trial_working_directory`)."""
    try:
        return trial.storage.trial_working_directory
    except Exception:
        return None


def trial_storage_folder(storage) -> tuple:
    """(pyarrow filesystem, path) of a trial's folder in the sweep's storage, from the trial's StorageContext
    (`tune.get_context().get_storage()` inside a trial; ray/train/_internal/storage.py `StorageContext.
    storage_filesystem` and `trial_fs_path`): where Ray uploads the trial's working directory."""
    return storage.storage_filesystem, storage.trial_fs_path


def trial_staging_dir(trial) -> str | None:
    """A trial's staging folder on the driver (ray/tune/experiment/trial.py `Trial.local_path`)."""
    return getattr(trial, "local_path", None)


# -- Ray: names and files ---------------------------------------------------------------------------------------------

RAY_STORAGE_LOGGER = "ray.train._internal.storage"  # logs "Checkpoint successfully created at: ..." each report
# the address `ray start` records on this machine (ray/_common/utils.py get_ray_address_file, default temp dir)
RAY_CURRENT_CLUSTER_FILE = "/tmp/ray/ray_current_cluster"


# -- Optuna -----------------------------------------------------------------------------------------------------------

def reopen_optuna_trial(study, frozen):
    """A live `optuna.trial.Trial` for a RUNNING FrozenTrial, built from its storage id (optuna/trial/_trial.py
    `Trial(study, trial_id)`; optuna/trial/_frozen.py `FrozenTrial._trial_id`); its `report` is public."""
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


# -- MLflow -----------------------------------------------------------------------------------------------------------

MLFLOW_DB_LOGGER = "mlflow.store.db.utils"  # logs "Creating initial MLflow database tables..."
EXPERIMENT_TAG_VALUE_LIMIT = 20000  # mlflow/utils/validation.py MAX_EXPERIMENT_TAG_VAL_LENGTH
# the experiment kind tag MLflow 3's UI reads (its bundle's CUSTOM_MODEL_DEVELOPMENT experiment kind)
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
# the artifact locations MLflow's SQL store keeps (mlflow/store/tracking/dbmodels/models.py SqlExperiment, SqlRun)
ARTIFACT_COLUMNS = (("experiments", "artifact_location", "experiment_id"), ("runs", "artifact_uri", "run_uuid"))


def repoint_artifact_locations(con, old: str, new: str) -> None:
    """In an open sqlite3 connection to an MLflow SQLite store: the artifact locations under `old` (a path, or
    file:// + a path) rewritten under `new`; others left alone. sqlite3.Error on a store of another shape."""
    for table, col, key in ARTIFACT_COLUMNS:
        for k, v in con.execute(f"SELECT {key}, {col} FROM {table}").fetchall():
            for prefix in ("file://", ""):
                if v and (v == prefix + old or v.startswith(prefix + old + "/")):
                    con.execute(f"UPDATE {table} SET {col} = ? WHERE {key} = ?",
                                (prefix + new + v[len(prefix + old):], k))
                    break


# The MLflow 3.x UI's saved views (mlflow/server/js/build: an experiment tag `mlflow.sharedViewState.<key>` holding
# the envelope {name, createdAt, updatedAt, state}, `state` the runs page's state as JSON; the runs page loads it
# from `?viewStateShareKey=<key>`).
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."


def shared_view_tag(key: str) -> str:
    return SHARED_VIEW_PREFIX + key


def saved_view_envelope(name: str, state: str, now_ms: int) -> str:
    """The tag value of a saved view: `state` is the runs-page state as a JSON string."""
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": state})


def runs_page(experiment_id: str, share_key: str = "") -> str:
    """The UI's address path of an experiment's runs page, showing the saved view `share_key` when given."""
    return f"#/experiments/{experiment_id}/runs" + (f"?viewStateShareKey={share_key}" if share_key else "")


def ui_column(kind: str, name: str) -> str:
    """The runs page's key of a column or sort order: params.`x`, metrics.`x`."""
    return f"{kind}.`{name}`"


def runs_page_state(search_filter: str, order_by: str, columns: list) -> dict:
    """The runs page's state: runs matching `search_filter` flat (sorting by a metric lists child runs flat, not
    folded under their parent), sorted by the column `order_by` smallest first, `columns` shown, every run in the
    charts."""
    return {"searchFilter": search_filter, "orderByKey": order_by,
            "orderByAsc": True, "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
            "selectedColumns": columns, "columnOrder": columns, "runsHiddenMode": "SHOW_ALL",
            "hideEmptyCharts": True, "useGroupedValuesInCharts": False}
