"""End-to-end sweeps on a local Ray (loopback, usage stats off) around the real p2core trainer. Faults are injected
from the test side (tests/faults.py), never by production code."""
import glob
import json
import os
import time

import pytest
import yaml

from helpers import M, ROOT, cli, mlflow_runs, sweep, sweep_file, trials_of

@pytest.fixture(scope="module")
def faulty(tmp_path_factory, ray_session):
    """3 configurations x 2 seeds, two at a time so ASHA's order is fixed: lr 1e-3 (good), 0.3 (a bad arm that ASHA
    stops at the first rung), 2e-3 whose seed 1 diverges (NaN loss) before the first rung; every trial that passes
    200 images crashes there once and is retried from its 128-image checkpoint. Two baseline rows. The rung at 128
    images is judged on a cheaper metric (rkid24_ddim10) than the sweep metric (rkid32_ddim5)."""
    import torch

    from p2core.config import config_from_dict
    from p2core.trainer import Trainer

    tmp = str(tmp_path_factory.mktemp("sweep"))
    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    bcfg = config_from_dict({**base, "train": {**base["train"], "total_images": 64},
                             "eval": {**base["eval"], "enabled": False}})
    Trainer.from_config(bcfg, os.path.join(tmp, "pre"), progress=False).run()
    ck = os.path.join(tmp, "pre", "checkpoints", "ckpt_000000000064.pt")
    torch.save(torch.load(ck, weights_only=True)["ema"], os.path.join(tmp, "ema_0.9999_000064.pt"))
    base["train"]["total_images"] = 256  # rungs at 128 and 256 (reduction factor 2)
    p = sweep_file(tmp, "faulty", base=base, space={"train.lr": {"grid": [1.0e-3, 0.3, 2.0e-3]}}, seeds=[0, 1],
                   scheduler={"type": "asha", "grace_period_images": 128, "reduction_factor": 2,
                              "rung_metrics": ["rkid24_ddim10"]},  # multi-fidelity: rung 128 on its own metric
                   search={"algorithm": "grid", "max_concurrent": 2},
                   baselines=[{"name": "ours64", "checkpoint": ck},
                              {"name": "official_style", "checkpoint": "ema_0.9999_000064.pt"}])
    storage = os.path.join(tmp, "store")
    faults = {"crash_at": 200, "nan_at": 100, "nan_when": {"train.lr": 2.0e-3, "train.seed": 1}}
    t0 = time.perf_counter()
    rc = sweep(ray_session, "run", p, "--storage", storage, faults=faults)
    return {"rc": rc, "storage": storage, "seconds": time.perf_counter() - t0, "tmp": tmp}


def by_config(trials):
    return {(t.config["train.lr"], t.seed): t for t in trials}


def test_sweep_runs_replicates_with_retry_divergence_and_group_asha(faulty):
    assert faulty["rc"] == 0
    t = by_config(trials_of(faulty["storage"], "faulty"))
    assert len(t) == 6
    for seed in (0, 1):
        good = t[(1e-3, seed)]
        assert good.state == "TERMINATED" and good.images_seen == 256  # crashed at 200, retried from 128
        assert os.path.exists(os.path.join(good.dir, "p2", ".injected_crash"))
    # the replicates of a configuration are the same configuration with their own seed
    assert t[(1e-3, 0)].group == t[(1e-3, 1)].group != t[(0.3, 0)].group == t[(0.3, 1)].group
    # ASHA judges the configuration on the mean over its seeds when the last seed reaches the rung: that seed is
    # stopped there; a seed that got there first trained on until its next report
    bad = [t[(0.3, 0)], t[(0.3, 1)]]
    assert any(x.state == "STOPPED" and x.images_seen == 128 for x in bad)
    assert t[(2e-3, 1)].state == "DIVERGED" and t[(2e-3, 1)].latest == float("inf")
    from sweeps.results.trials import group_rows

    rows = group_rows(list(t.values()), M, 256, 2)
    assert all(r.group == t[(1e-3, 0)].group for r in rows if r.complete) and rows[0].complete
    assert not any(r.complete for r in rows if r.group in (bad[0].group, t[(2e-3, 0)].group))
    # every (trial, steps) pair of a full-length trial is in the results
    assert {"rkid32_ddim5", "rkid32_ddim10", "rfid32_ddim5", "rfid32_ddim10"} <= set(t[(1e-3, 0)].points[256])
    # multi-fidelity: the 128-image rung computed only its own metric, and ASHA and the rows compared that one
    # there; the sweep metric exists only at the end (history, `best`, the plots never mix the two)
    for x in t.values():
        if 128 in x.points and not x.diverged:
            assert "rkid24_ddim10" in x.points[128] and M not in x.points[128]
            assert x.points[128]["gen_images_ddim10"] == 24
    assert [p for p, _ in t[(1e-3, 0)].history] == [256]
    stopped = next(x for x in bad if x.state == "STOPPED" and x.images_seen == 128)
    assert stopped.history == [] and stopped.latest is None
    rr = [json.loads(x) for x in open(os.path.join(stopped.dir, "result.json"))]
    assert rr[-1]["rung_metric"] == "rkid24_ddim10" and rr[-1]["ckpt_score"] == float("inf") and M not in rr[-1]
    assert rr[-1]["rung_score"] == rr[-1]["rkid24_ddim10"]
    # checkpoints: the best by the sweep metric and the latest are kept (Tune's checkpoint folders only)
    good = t[(1e-3, 0)]
    assert not glob.glob(os.path.join(good.dir, "p2", "checkpoints", "*.pt"))
    rows = [json.loads(x) for x in open(os.path.join(good.dir, "result.json"))]
    best = min(rows, key=lambda x: x["ckpt_score"])
    kept = sorted(os.path.basename(p) for p in glob.glob(os.path.join(good.dir, "checkpoint_*")))
    assert best["checkpoint_dir_name"] in kept and rows[-1]["checkpoint_dir_name"] in kept and len(kept) <= 2
    # the embedded Ray stays on loopback
    assert {x["node_ip"] for x in rows} == {"127.0.0.1"}


def test_mlflow_one_run_per_replicate_with_states(faulty):
    c, runs = mlflow_runs(faulty["storage"], "faulty")
    parents = [x for x in runs if x.data.tags.get("p2sweep.role") == "sweep"]
    kids = [x for x in runs if x.data.tags.get("p2sweep.role") == "trial"]
    assert len(parents) == 1 and len(kids) == 6
    assert len({x.data.tags["p2sweep.replicate"] for x in kids}) == 6
    assert all(x.info.status != "RUNNING" for x in runs)
    by = {(float(x.data.params["train.lr"]), int(x.data.params["train.seed"])): x for x in kids}
    assert by[(2e-3, 1)].info.status == "FAILED" and "diverged" in by[(2e-3, 1)].data.tags["p2sweep.failure"]
    stopped = [by[(0.3, s)] for s in (0, 1) if by[(0.3, s)].data.tags.get("p2sweep.stopped_at_rung")]
    assert stopped and all(x.info.status == "FINISHED" and x.data.tags["p2sweep.stopped_at_rung"] == "128"
                           for x in stopped)
    good = by[(1e-3, 0)]
    assert good.info.status == "FINISHED" and "rkid32_ddim10" in good.data.metrics
    assert good.data.params["diffusion.p2_gamma"] == "0.0" and good.data.params["model.num_channels"] == "32"
    hist = c.get_metric_history(good.info.run_id, "loss_cleanup")
    assert len(hist) >= 4 and max(m.step for m in hist) == 256
    arts = {a.path for a in c.list_artifacts(good.info.run_id)}
    assert {"trial_config.yaml", "weight_vs_snr.png", "samples", "loss.png", "metrics.jsonl"} <= arts
    base = [x for x in runs if x.data.tags.get("p2sweep.role") == "baseline"]
    assert sorted(x.data.tags["p2sweep.baseline"] for x in base) == ["official_style", "ours64"]
    assert base[0].data.metrics["rkid32_ddim5"] == pytest.approx(base[1].data.metrics["rkid32_ddim5"])
    p = parents[0]
    assert {"version.torch", "version.ray", "version.mlflow", "git_commit", "sweep.id"} <= set(p.data.params)
    assert {"results.csv", "sweep.yaml", "metric_vs_images.png"} <= {a.path for a in c.list_artifacts(p.info.run_id)}
    exp = c.get_experiment_by_name("faulty")
    assert exp.artifact_location.startswith(os.path.join(faulty["storage"], "mlartifacts"))
    # the comparison view `p2sweep ui` opens (and a tracking server's own UI lists): the trials flat by the metric
    view = json.loads(json.loads(exp.tags["mlflow.sharedViewState.p2sweep"])["state"])
    # (by each configuration's place in the ranking `best` prints, not by each run's own value)
    assert view["orderByKey"] == "metrics.`p2sweep_rank`" and view["searchFilter"] == "tags.`p2sweep.role` = 'trial'"
    assert view["selectedColumns"][:5] == ["params.`train.lr`", "params.`train.seed`", "metrics.`p2sweep_rank`",
                                           f"metrics.`{M}`", "metrics.`rkid32_ddim10`"]
    assert good.data.metrics["p2sweep_rank"] == 1.0  # best ranks lr 1e-3 first (test_status_best_export_...)


def test_status_best_export_checkpoint_and_compare(faulty, tmp_path):
    st = faulty["storage"]
    r = cli("status", "faulty", "--storage", st)
    assert r.returncode == 0 and "DIVERGED" in r.stdout and "STOPPED" in r.stdout
    assert "official_style" in r.stdout and "baselines (evaluated, not trained)" in r.stdout
    out = tmp_path / "best.yaml"
    r = cli("best", "faulty", "--storage", st, "--export", str(out))
    assert r.returncode == 0, r.stderr
    assert "(lost seeds)" in r.stdout  # lr 2e-3 lost its diverged seed
    text = out.read_text()
    assert text.startswith("# Best configuration of sweep 'faulty'") and "lr: 0.001" in text
    exported = yaml.safe_load(text)
    assert "ddim" in exported["eval"]["sampling_steps"][0] and exported["train"]["seed"] in (0, 1)
    ck = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("checkpoint: "))
    r = cli("sample", ck, "--num-samples", "4", "--steps", "ddim5", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0 and (tmp_path / "g.png").exists(), r.stderr
    r = cli("train", str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    r = cli("compare", "faulty", "--storage", st, "--plot", str(tmp_path / "c.png"))
    assert r.returncode == 0 and (tmp_path / "c.png").exists() and "baseline ours64" in r.stdout
    for cmd in ("status", "best", "resume"):
        r = cli(cmd, "nosuch", "--storage", st)
        assert r.returncode == 2 and "nosuch" in r.stderr and "Traceback" not in r.stderr


def test_report_equals_best_and_is_one_self_contained_page(faulty, tmp_path):
    """`p2sweep report`: its table numbers are the ones `best` prints, every figure is embedded, the Markdown's
    images exist, report.json is strict JSON, and the report is logged to the sweep's parent MLflow run."""
    st = faulty["storage"]
    out = tmp_path / "rep"
    r = cli("report", "faulty", "--storage", st, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "report (finished)" in r.stdout
    data = json.loads((out / "report.json").read_text())  # strict: no NaN/Infinity tokens
    best = cli("best", "faulty", "--storage", st)
    printed = {}
    for line in best.stdout.splitlines():
        cells = [c.strip() for c in line.split("|") if c.strip()] if "|" in line else line.split()
        if len(cells) > 6 and cells[0].isdigit():
            printed[(int(cells[0]), cells[2])] = (cells[4], cells[6])  # (config, steps) -> (mean, seeds)
    assert printed, best.stdout
    rows = [(name.split("_")[-1], row) for name, rs in data["tables"].items() for row in rs]
    assert len(rows) == len(printed)
    for spec, row in rows:
        mean, seeds = printed[(row["group"], spec)]
        assert (f"{row['mean']:.5g}" if row["mean"] != "inf" else "inf") == mean
        assert seeds.startswith(f"{row['n']}/{row['seeds_expected']}")
    # per-seed values sit under every aggregate; the diverged seed's lost value never enters a mean
    good = next(row for row in data["tables"][M] if row["complete"])
    assert len(good["values"]) == 2 and good["mean"] == pytest.approx(sum(good["values"]) / 2)
    assert data["sweep"]["states"].get("DIVERGED") == 1 and data["stops"]
    assert data["cost"]["total"]["images_trained"] == sum(t.images_seen for t in trials_of(st, "faulty"))
    assert data["cost"]["total"]["images_generated"] > 0 and data["cost"]["total"]["feature_seconds"] > 0
    html_text = (out / "report.html").read_text()
    assert "src=\"figures" not in html_text and html_text.count("data:image/png;base64,") >= 4
    assert (out / "report.html").stat().st_size < 1_000_000
    md = (out / "report.md").read_text()
    for target in __import__("re").findall(r"\]\((figures/[^)]+)\)", md):
        assert (out / target).is_file(), target
    assert "figures/grid_" in md  # sample grids reached the storage (sync_artifacts) and the report
    c, runs = mlflow_runs(st, "faulty")
    parent = next(x for x in runs if x.data.tags.get("p2sweep.role") == "sweep")
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/report.json"} <= arts
    r = cli("report", "nosuch", "--storage", st)
    assert r.returncode == 2 and "nosuch" in r.stderr and "Traceback" not in r.stderr


def test_a_moved_storage_keeps_working(faulty, ray_session, tmp_path):
    """The storage folder copied elsewhere (the original left as it was): status, best and report read the copy,
    the checkpoints they name are the copy's; `reroot` points MLflow's artifact locations at it (report never does:
    test_tracking_trust), and resume restores from it."""
    import shutil

    from mlflow.tracking import MlflowClient

    from sweeps.record.meta import load_meta

    st = str(tmp_path / "moved")
    shutil.copytree(faulty["storage"], st)
    meta = load_meta("faulty", st)
    assert meta.moved_from == faulty["storage"] and meta.paths.mlflow_uri == f"sqlite:///{st}/mlflow.db"
    r = cli("best", "faulty", "--storage", st)
    assert r.returncode == 0, r.stderr
    ck = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("checkpoint: "))
    assert ck.startswith(st) and os.path.isfile(ck)
    r = cli("reroot", "faulty", "--storage", st)
    assert r.returncode == 0 and f"re-rooted from {faulty['storage']} to {st}" in r.stdout, r.stderr
    r = cli("report", "faulty", "--storage", st)
    assert r.returncode == 0, r.stderr
    c = MlflowClient(f"sqlite:///{st}/mlflow.db")
    exp = c.get_experiment_by_name("faulty")
    assert exp.artifact_location.startswith(st)
    parent = next(x for x in c.search_runs([exp.experiment_id]) if x.data.tags.get("p2sweep.role") == "sweep")
    assert parent.info.artifact_uri.startswith(st)
    assert os.path.isfile(os.path.join(parent.info.artifact_uri, "report", "report.html"))  # logged into the copy
    assert load_meta("faulty", st).moved_from == ""  # recorded in the copy's p2sweep.json
    old = MlflowClient(f"sqlite:///{faulty['storage']}/mlflow.db").get_experiment_by_name("faulty")
    assert old.artifact_location.startswith(faulty["storage"])  # the original is untouched
    n_before = {t.trial_id: t.images_seen for t in trials_of(st, "faulty")}
    assert sweep(ray_session, "resume", "faulty", "--storage", st) == 0
    assert {t.trial_id: t.images_seen for t in trials_of(st, "faulty")} == n_before  # finished: nothing retrained


def test_object_storage_needs_a_tracking_server_and_never_takes_credentials(tmp_path):
    p = sweep_file(str(tmp_path), "s3bad")
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "MLFLOW_TRACKING_URI": ""}
    r = cli("run", p, "--storage", "s3://bucket/prefix", env=env)
    assert r.returncode == 2 and "MLFLOW_TRACKING_URI" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("run", p, "--storage", "s3://", env=env)
    assert r.returncode == 2 and "bucket" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("change,needle", [
    ({"space": {"diffusion.p2_gama": {"grid": [0]}}}, "space.diffusion.p2_gama"),
    ({"space": {"diffusion.p2_k": {"between": [0, 1]}}}, "unknown value kind"),
    ({"space": {"diffusion.p2_k": {"grid": [-1.0]}}}, "space.diffusion.p2_k"),
    ({"metric": "fid10k_250"}, "metric"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
    ({"scheduler": {"ema_rule": "mean"}}, "scheduler.ema_rule: unknown rule 'mean'"),
    ({"scheduler": {"ema_rule": "best"}}, "scheduler.ema_rule: best needs eval.ema_sigma_rels"),
    ({"scheduler": {"type": "asha", "grace_period_images": 128, "rung_metrics": ["rkid8_ddim5", "rkid8_ddim5"]}},
     "2 metrics for 1 rung(s)"),
    ({"scheduler": {"type": "asha", "rung_metrics": ["kid8_ddim5"]}}, "scheduler.rung_metrics: kid8_ddim5 needs eval.extractor"),
    ({"scheduler": {"type": "asha", "rung_metrics": ["rkid8_ddim500"]}}, "scheduler.rung_metrics"),
    ({"search": {"algorithm": "optuna"}}, "grid"),
    ({"resources": {"cpu": 0}}, "resources.cpu"),
    ({"bogus": 1}, "bogus"),
    ({"tracking": {"aws_secret_access_key": "x"}}, "tracking.aws_secret_access_key: credentials never come"),
    ({"tracking": {"s3_endpoint_url": "127.0.0.1:9000"}}, "tracking.s3_endpoint_url"),
    ({"tracking": {"optuna_storage": "postgresql://me:pw@db/optuna"}}, "tracking.optuna_storage: a URL with a password"),
    ({"baselines": [{"name": "x", "checkpoint": "/nonexistent.pt"}]}, "baselines[0].checkpoint"),
])
def test_bad_sweep_files_exit_2_naming_the_key(tmp_path, change, needle):
    p = sweep_file(str(tmp_path), "bad", **change)
    r = cli("run", p, "--storage", str(tmp_path / "s"), "--dry-run", timeout=60)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_dry_run_prints_trials_rungs_and_work(tmp_path):
    r = cli("run", os.path.join(ROOT, "search_spaces", "smoke.yaml"), "--dry-run", "--storage", str(tmp_path),
            "--cpus", "2")
    assert r.returncode == 0
    assert "ASHA rungs (images): [128, 384]" in r.stdout and "trials: 4" in r.stdout and "cpu 2" in r.stdout
    assert not os.path.exists(tmp_path / "smoke")
    r = cli("run", os.path.join(ROOT, "search_spaces", "smoke.yaml"), "--dry-run", "--gpus", "2")
    assert r.returncode == 2 and "resources.gpu" in r.stderr
