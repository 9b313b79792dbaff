"""The private and undocumented parts of Ray Tune, Optuna and MLflow that sweeps/compat.py relies on, one test per
touch: each fails when the installed library no longer has what compat.py expects. No Ray session is started (the
objects are built without one; a Ray session folder, where needed, is pointed at tmp_path)."""
import datetime as dt
import inspect
import json
import logging
import os
import re
import sqlite3
import types
import warnings

import pytest

from sweeps import compat


@pytest.fixture
def session_dir(tmp_path, monkeypatch):
    """Ray's session folder for StorageContext paths, as if Ray had started (it asserts ray.is_initialized())."""
    import ray.train._internal.storage as rs

    monkeypatch.setattr(rs, "_get_ray_train_session_dir", lambda: str(tmp_path / "session"))
    return str(tmp_path / "session")


def _trial(tmp_path, **kw):
    """A real Tune Trial, as the driver holds one (stub: no trainable registered)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    st = StorageContext(storage_path=str(tmp_path / "storage"), experiment_dir_name="exp", trial_dir_name="t1")
    return Trial("__fake", stub=True, trial_id="a1", storage=st, **kw)


# -- versions ---------------------------------------------------------------------------------------------------------

def test_the_installed_versions_are_the_tested_ones_and_others_are_warned_about(monkeypatch):
    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()  # the versions every test below was written against
    monkeypatch.setattr(ray, "__version__", "9.0.0")
    with pytest.warns(UserWarning, match="tested with ray 2.60.x, found 9.0.0"):
        compat.check_versions()
    from sweeps.tune import schedulers

    assert schedulers.check_versions is compat.check_versions  # the old name still works


# -- a restored Tuner -------------------------------------------------------------------------------------------------

def test_a_restored_tuner_hands_out_the_configs_it_will_run_with(tmp_path):
    from ray import tune
    from ray.tune.impl.tuner_internal import TunerInternal
    from ray.tune.schedulers import FIFOScheduler

    class Marker(tune.Callback):
        pass

    def trainable(config):
        pass

    tune.Tuner(trainable, tune_config=tune.TuneConfig(scheduler=FIFOScheduler()),
               run_config=tune.RunConfig(name="x", storage_path=str(tmp_path), callbacks=[Marker()]))
    restored = tune.Tuner.restore(str(tmp_path / "x"), trainable, resume_unfinished=True)  # reads tuner.pkl
    inner = compat.tuner_internal(restored)
    assert isinstance(inner, TunerInternal)
    rc, tc = compat.restored_configs(inner)
    assert [type(c).__name__ for c in rc.callbacks] == ["Marker"] and isinstance(tc.scheduler, FIFOScheduler)
    # the objects themselves: what is changed on them is what the resumed run uses
    assert compat.restored_configs(inner) == (rc, tc) and rc is inner.get_run_config() and tc is inner._tune_config
    args = inspect.getsource(TunerInternal._get_tune_run_arguments)
    assert "callbacks=self._run_config.callbacks" in args and "verbose=self._run_config.verbose" in args
    resume = inspect.getsource(TunerInternal._fit_resume)
    assert "search_alg=self._tune_config.search_alg" in resume and "scheduler=self._tune_config.scheduler" in resume
    assert compat.tuner_internal(types.SimpleNamespace()) is None  # a Ray Client Tuner has none


def test_a_restored_search_generator_creates_new_trials_in_the_storage_it_is_pointed_at(tmp_path):
    from ray.tune.experiment import Experiment
    from ray.tune.search import SearchGenerator, Searcher

    class One(Searcher):
        def suggest(self, trial_id):
            return {"x": 1}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

    first = SearchGenerator(One(metric="m", mode="min"))
    first.add_configurations([Experiment("e", run=lambda config: None, storage_path=str(tmp_path / "old"))])
    state = first.get_state()
    assert "experiment" in state  # the Experiment of the first run comes back with the state
    gen = SearchGenerator(One(metric="m", mode="min"))
    gen.set_state(state)
    assert gen._experiment is state["experiment"]
    compat.reroot_search_generator(gen, str(tmp_path / "new"), None)
    trial = gen.next_trial()
    assert trial.storage.storage_fs_path == str(tmp_path / "new")
    assert trial.storage.experiment_fs_path == str(tmp_path / "new" / "e")
    assert state["experiment"].storage is state["experiment"].spec["storage"]


# -- schedulers and searchers -----------------------------------------------------------------------------------------

def test_the_declared_metric_is_what_tune_reads_and_what_a_pickle_keeps():
    import pickle

    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import Searcher

    s = FIFOScheduler()
    compat.set_declared_metric(s, "rung_score", "min")
    assert s.metric == "rung_score" and s._mode == "min"
    assert s.set_search_properties("other", "max") is False  # Tune cannot put its own metric over it
    searcher = Searcher(metric="a", mode="min")
    assert searcher.__dict__[compat.PICKLED_METRIC] == "a"
    assert pickle.loads(pickle.dumps(searcher)).__dict__[compat.PICKLED_METRIC] == "a"
    compat.set_declared_metric(searcher, "rung_score")
    assert searcher.metric == "rung_score" and searcher.mode == "min"
    # Tune checks that every result holds the scheduler's and the searcher's metric
    src = inspect.getsource(TuneController._validate_result_metrics)
    assert "self._scheduler_alg.metric" in src and "self._search_alg.metric" in src


def test_a_failure_is_counted_before_the_scheduler_hears_of_it(tmp_path, session_dir):
    from ray.tune.execution.tune_controller import TuneController

    src = inspect.getsource(TuneController._process_trial_failure)
    assert src.index("trial.handle_error(") < src.index("self._scheduler_alg.on_trial_error(")
    trial = _trial(tmp_path, max_failures=1)
    os.makedirs(trial.local_path, exist_ok=True)
    trial.handle_error(RuntimeError("first"))
    assert trial.num_failures == 1 and not compat.out_of_retries(trial)  # one retry left
    trial.handle_error(RuntimeError("second"))
    assert trial.num_failures == 2 and compat.out_of_retries(trial)
    # the error file: its name and the failure lines results.ended_at reads
    assert trial.run_metadata.error_filename == compat.ERROR_FILE
    with open(os.path.join(trial.local_path, compat.ERROR_FILE)) as f:
        times = compat.failure_times(f.read())
    assert len(times) == 2
    assert abs(dt.datetime.strptime(times[-1], compat.TUNE_DATE) - dt.datetime.now()) < dt.timedelta(minutes=1)


# -- Tune's saved state -----------------------------------------------------------------------------------------------

def test_the_state_file_names_are_tunes():
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import SearchGenerator, Searcher

    assert compat.STATE_PATTERNS == tuple(c.CKPT_FILE_TMPL.format("*") for c in (
        TuneController, SearchGenerator, Searcher))
    assert compat.EXPERIMENT_STATE == compat.STATE_PATTERNS[0]
    assert compat.state_session("experiment_state-2026-12-02_20-46-35.json") == "2026-12-02_20-46-35"
    assert compat.state_session("searcher-state-2026-12-02_20-46-35.pkl") == "2026-12-02_20-46-35"
    assert compat.state_session("tuner.pkl") == ""
    # a session is named by its local start time, which the state records in epoch seconds
    init = inspect.getsource(TuneController.__init__)
    assert "self._start_time = time.time()" in init
    assert re.search(r"fromtimestamp\(self\._start_time\)\.strftime\(\s*\"" + re.escape(compat.TUNE_DATE), init)


def test_an_experiment_state_holds_the_trials_as_compat_reads_them(tmp_path, session_dir):
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.utils.serialization import TuneFunctionEncoder

    src = inspect.getsource(TuneController.save_to_dir)
    assert '"trial_data": list(self._get_trial_checkpoints().values())' in src
    assert '"stats": {"start_time": self._start_time}' in src
    assert "trial.get_json_state()" in inspect.getsource(TuneController._get_trial_checkpoints)
    trial = _trial(tmp_path, config={"train.seed": 3}, max_failures=0)
    trial.relative_logdir = "t1"
    os.makedirs(trial.local_path, exist_ok=True)
    trial.update_last_result({"images_seen": 128, "final": 1})
    trial.handle_error(RuntimeError("boom"))
    trial.set_status("ERROR")
    data = json.loads(json.dumps({"trial_data": [trial.get_json_state()], "stats": {"start_time": 1.5e9}},
                                 cls=TuneFunctionEncoder))
    (tr, rt), = compat.saved_trials(data)
    assert tr[compat.TRIAL_ID] == "a1" and tr["status"] == "ERROR" and tr["config"] == {"train.seed": 3}
    assert tr["relative_logdir"] == "t1"
    assert rt["last_result"]["images_seen"] == 128 and rt["num_failures"] == 1
    assert rt["error_filename"] == compat.ERROR_FILE
    assert compat.state_start_time(data) == 1.5e9 and compat.state_start_time({}) == 0.0


# -- what Tune adds to every result -----------------------------------------------------------------------------------

def test_the_result_keys_tune_fills_in_are_the_ones_compat_names():
    import ray.tune.result as TR
    from ray.tune.trainable import Trainable

    named = {v for k, v in vars(TR).items() if k.isupper() and isinstance(v, str)} | set(TR.AUTO_RESULT_KEYS)
    assert compat.TUNE_RESULT_KEYS <= named, compat.TUNE_RESULT_KEYS - named
    assert {compat.TRIAL_ID, compat.DATE, compat.TIMESTAMP, compat.CHECKPOINT_DIR_NAME} <= set(TR.AUTO_RESULT_KEYS) | {
        TR.TRIAL_ID}
    fake = types.SimpleNamespace(trial_id="a1", _time_total=2.0, _local_ip="127.0.0.1", config={},
                                 _time_since_restore=2.0, _iterations_since_restore=1, _timesteps_since_restore=0)
    now = dt.datetime(2026, 12, 1, 20, 0, 0)
    auto = Trainable.get_auto_filled_metrics(fake, now=now, time_this_iter=1.0)
    assert set(auto) - {"config"} <= compat.TUNE_RESULT_KEYS, set(auto) - compat.TUNE_RESULT_KEYS
    assert auto[compat.DATE] == now.strftime(compat.TUNE_DATE) == "2026-12-01_20-00-00"
    assert isinstance(auto[compat.TIMESTAMP], int) and auto[compat.TRIAL_ID] == "a1"
    train = inspect.getsource(Trainable.train)
    assert "result.setdefault(DONE" in train and "result.setdefault(TRAINING_ITERATION" in train
    assert {TR.DONE, TR.TRAINING_ITERATION, TR.SHOULD_CHECKPOINT, TR.EXPERIMENT_TAG} <= compat.TUNE_RESULT_KEYS
    from sweeps.record.trial_report import RESERVED

    assert compat.TUNE_RESULT_KEYS <= RESERVED  # never taken for evaluation numbers


# -- a trial's folders on the driver ----------------------------------------------------------------------------------

def test_a_trials_folders_are_found_where_ray_puts_them(tmp_path, session_dir):
    from ray.tune.experiment import Trial

    trial = _trial(tmp_path)
    assert isinstance(Trial.local_path, property) and isinstance(Trial.path, property)
    work, staging = compat.trial_working_directory(trial), compat.trial_staging_dir(trial)
    assert work.startswith(session_dir) and work.endswith("/exp/working_dirs/t1")
    assert staging.startswith(session_dir) and staging.endswith("/exp/driver_artifacts/t1")
    assert trial.path == str(tmp_path / "storage" / "exp" / "t1")


def test_a_trials_storage_folder_is_where_ray_uploads_its_working_directory(tmp_path, session_dir):
    import inspect

    import pyarrow.fs as pafs
    from ray.train._internal.storage import StorageContext

    st = _trial(tmp_path).storage
    fs, path = compat.trial_storage_folder(st)
    assert isinstance(fs, pafs.FileSystem) and path == str(tmp_path / "storage" / "exp" / "t1")
    assert "remote_dir=self.trial_fs_path" in inspect.getsource(StorageContext.persist_artifacts)


def test_a_trials_working_directory_is_none_where_ray_cannot_say(tmp_path):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray runs in this process")
    assert compat.trial_working_directory(_trial(tmp_path)) is None  # no Ray session here
    assert compat.trial_working_directory(types.SimpleNamespace()) is None  # no storage context


# -- Ray: names and files ---------------------------------------------------------------------------------------------

def test_rays_logger_and_address_file_are_where_compat_says(monkeypatch):
    import ray.train._internal.storage as rs
    from ray._common.utils import get_ray_address_file

    assert rs.logger.name == compat.RAY_STORAGE_LOGGER
    assert "Checkpoint successfully created at" in inspect.getsource(rs)
    for var in ("RAY_TMPDIR", "TMPDIR"):
        monkeypatch.delenv(var, raising=False)
    assert get_ray_address_file(None) == compat.RAY_CURRENT_CLUSTER_FILE


# -- Optuna -----------------------------------------------------------------------------------------------------------

def test_a_running_optuna_trial_is_reopened_by_its_storage_id(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="minimize")
    study.ask()
    study.ask()
    again = optuna.load_study(study_name="s", storage=url)  # another process: only the frozen trials
    frozen = next(t for t in again.get_trials(deepcopy=False) if t.number == 1)
    compat.reopen_optuna_trial(again, frozen).report(0.25, 384)
    got = {t.number: t.intermediate_values for t in study.get_trials(deepcopy=False)}
    assert got == {0: {}, 1: {384: 0.25}}


# -- MLflow -----------------------------------------------------------------------------------------------------------

def test_artifact_locations_are_rewritten_in_mlflows_own_sqlite_schema(tmp_path):
    from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlRun
    from mlflow.tracking import MlflowClient

    db = str(tmp_path / "mlflow.db")
    old, new = "/old/place", "/new/place"
    c = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = c.create_experiment("e", artifact_location=f"file://{old}/mlartifacts/e")
    other = c.create_experiment("o", artifact_location="/elsewhere/o")
    run = c.create_run(exp)
    assert run.info.artifact_uri.startswith(f"file://{old}/mlartifacts/e/")
    for table, col, key in compat.ARTIFACT_COLUMNS:
        model = {"experiments": SqlExperiment, "runs": SqlRun}[table]
        assert model.__tablename__ == table and {col, key} <= set(model.__table__.columns.keys())
    con = sqlite3.connect(db)
    try:
        for table, col, key in compat.ARTIFACT_COLUMNS:
            assert {col, key} <= {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
        with con:
            compat.repoint_artifact_locations(con, old, new)
    finally:
        con.close()
    c = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert c.get_experiment(exp).artifact_location == f"file://{new}/mlartifacts/e"
    assert c.get_run(run.info.run_id).info.artifact_uri.startswith(f"file://{new}/mlartifacts/e/")
    assert c.get_experiment(other).artifact_location == "/elsewhere/o"  # outside the old root: left alone


def test_mlflows_tag_limit_logger_and_experiment_kind_are_where_compat_says():
    import mlflow.store.db.utils as dbu
    from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH

    assert compat.EXPERIMENT_TAG_VALUE_LIMIT == MAX_EXPERIMENT_TAG_VAL_LENGTH
    assert dbu._logger.name == compat.MLFLOW_DB_LOGGER
    assert "Creating initial MLflow database tables" in inspect.getsource(dbu)
    assert logging.getLogger(compat.MLFLOW_DB_LOGGER) is dbu._logger
    ui = _ui_bundle()
    key, value = compat.EXPERIMENT_KIND_TAG
    assert f'"{key}"' in ui and f'CUSTOM_MODEL_DEVELOPMENT="{value}"' in ui


def _ui_bundle() -> str:
    import mlflow

    d = os.path.join(os.path.dirname(mlflow.__file__), "server", "js", "build", "static", "js")
    text = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".js"):
            with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                text.append(f.read())
    assert text, f"no MLflow UI bundle in {d}"
    return "\n".join(text)


def test_the_saved_view_is_in_the_format_the_mlflow_ui_loads():
    ui = _ui_bundle()
    assert f'"{compat.SHARED_VIEW_PREFIX}"' in ui and '"viewStateShareKey"' in ui
    # the UI's envelope check (any other shape is "share key is invalid")
    assert "expected an object with a string `name`, number `createdAt`, and string `state`" in ui
    env = json.loads(compat.saved_view_envelope("v", json.dumps({"a": 1}), 1234))
    assert env == {"name": "v", "createdAt": 1234, "updatedAt": 1234, "state": '{"a": 1}'}
    assert compat.shared_view_tag("p2sweep") == "mlflow.sharedViewState.p2sweep"
    # the runs page and its state
    assert 'experimentPageTabRuns(){return(0,r.Oz)("/experiments/:experimentId/runs")' in ui or \
        '"/experiments/:experimentId/runs"' in ui
    assert compat.runs_page("7", "p2sweep") == "#/experiments/7/runs?viewStateShareKey=p2sweep"
    assert compat.runs_page("7") == "#/experiments/7/runs"
    order = compat.ui_column("metrics", "kid64_ddim10")
    assert r"/^(metrics|params)\.`(.*?)`$/" in ui  # how the UI reads orderByKey back
    assert re.match(r"^(metrics|params)\.`(.*?)`$", order).groups() == ("metrics", "kid64_ddim10")
    state = compat.runs_page_state("tags.`p2sweep.role` = 'trial'", order, [order])
    for k, v in state.items():
        assert f"{k}:" in ui or f'"{k}"' in ui, k
        if isinstance(v, str) and k in ("startTime", "lifecycleFilter", "runsHiddenMode"):
            assert f'"{v}"' in ui, (k, v)
