"""The real kill-and-resume (case 7 of "sweeps, part 2"): three `p2sweep` driver processes, each with its own local
Ray, two of them SIGKILLed with their whole session. A multi-process set-up of about a minute: `make test-cluster`
(which `.ci/run` runs after `make test`)."""
import os
import signal
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import ROOT, cli, mlflow_runs, sweep_file, trials_of  # noqa: E402

pytestmark = pytest.mark.cluster


# -- cases 7 and 1 (Optuna with seeds and ASHA): SIGKILL right after a tell, twice, then resume to the end ----------

def test_optuna_resume_after_kills_right_after_a_tell(tmp_path):
    """Optuna, 2 configurations x 2 seeds, ASHA, 2 trials at a time. The driver's whole session (its local Ray
    included) is SIGKILLed right after Optuna was told a configuration's result, with Tune's periodic state save
    pushed out (so Tune's saved state is older than Optuna's); twice. Then resume to the end: one Optuna trial per
    configuration, told once, nothing RUNNING in Optuna or MLflow, one MLflow run per (configuration, seed)."""
    import optuna

    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    base["train"]["total_images"] = 256
    p = sweep_file(str(tmp_path), "optkill", base=base, space={"diffusion.p2_gamma": {"uniform": [0.0, 2.0]}},
                   seeds=[0, 1], search={"algorithm": "optuna", "num_samples": 2, "max_concurrent": 2, "seed": 0},
                   scheduler={"type": "asha", "grace_period_images": 128, "reduction_factor": 2})
    storage = str(tmp_path / "store")
    slow_save = {"TUNE_GLOBAL_CHECKPOINT_S": "3600"}
    r = cli("run", p, "--storage", storage, faults={"kill_after_tell": True}, env=slow_save, session=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    from sweeps.record.meta import load_meta

    meta = load_meta("optkill", storage)
    study = optuna.load_study(study_name=meta.study_name, storage=f"sqlite:///{storage}/optuna.db")
    told = [t.state for t in study.get_trials() if t.state != optuna.trial.TrialState.RUNNING]
    assert len(told) == 1  # killed mid-sweep, right after the first tell
    r = cli("resume", "optkill", "--storage", storage, faults={"kill_after_tell": True}, env=slow_save,
            session=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = cli("resume", "optkill", "--storage", storage)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = trials_of(storage, "optkill")
    assert len(trials) == 4 and all(t.state in ("TERMINATED", "STOPPED") for t in trials)
    groups = {}
    for t in trials:
        groups.setdefault(t.group, []).append(t)
    assert sorted(groups) == [0, 1] and all(sorted(x.seed for x in g) == [0, 1] for g in groups.values())
    assert all(g[0].params == g[1].params for g in groups.values())  # the replicates share the values
    ot = study.get_trials()
    assert len(ot) == 2  # one Optuna trial per configuration, none asked twice across the kills
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in ot]
    for g in groups.values():
        o = next(x for x in ot if x.params["diffusion.p2_gamma"] == pytest.approx(g[0].params["diffusion.p2_gamma"]))
        full = all(x.state == "TERMINATED" for x in g)
        assert o.state == (optuna.trial.TrialState.COMPLETE if full else optuna.trial.TrialState.PRUNED)
    c, runs = mlflow_runs(storage, "optkill")
    kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
    assert len(kids) == 4 and not [x for x in runs if x.info.status == "RUNNING"]
    assert len({x.data.tags["p2sweep.replicate"] for x in kids}) == 4
    assert len([x for x in runs if x.data.tags.get("p2sweep.role") == "sweep"]) == 1
    # one continuous metrics.jsonl per trial in the storage, across the kills and resumes (each resumed trial starts
    # in a fresh working folder: its earlier records come back from its checkpoint)
    import json

    for t in trials:
        recs = [json.loads(x) for x in open(os.path.join(t.dir, "p2", "metrics.jsonl"))]
        seen = [r["images_seen"] for r in recs if r.get("kind") == "train"]
        assert seen == list(range(64, t.images_seen + 1, 64)), (t.trial_id, seen)
