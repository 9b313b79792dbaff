"""Post-hoc EMAs (a power-function EMA, eval.ema_sigma_rels, eval.ema_choose_on) through a local Ray: rows per
(configuration, steps, EMA), the MLflow metrics, the report and `best --export` of an EMA row. A file of its own
so that it runs beside test_sweep.py's long fault-injected fixture."""
import glob
import os

import yaml

from helpers import M, ROOT, mlflow_runs, sweep, sweep_file, trials_of


def test_post_hoc_emas_are_rows_like_sampling_steps_and_export_loads_strictly(tmp_path, ray_session, capsys):
    """A power-EMA sweep with eval.ema_sigma_rels, through Ray: every evaluation scores the reconstructed EMAs,
    `best` and `compare` have a row / column per (steps, EMA), MLflow has their metrics, and `best --export` of an
    EMA row writes its sigma_rel and the reconstructed weights as a bare state_dict that the UNet (official key
    names) loads strictly, equal to a reconstruction from the trial's own snapshot files."""
    import torch

    from p2core import phema
    from p2core.unet import model_from_config
    from sweeps.record.replicate import trial_config
    from sweeps.results import trials as R

    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    base["train"].update(total_images=128, eval_every_images=64,
                         ema={"type": "power", "sigma_rels": [0.05, 0.10], "snapshot_every_images": 32})
    base["eval"]["ema_sigma_rels"] = [0.07, 0.15]
    p = sweep_file(str(tmp_path), "posthoc", base=base, space={"diffusion.p2_gamma": {"grid": [1.0]}},
                   scheduler={"type": "none"})
    storage = str(tmp_path / "store")
    assert sweep(ray_session, "run", p, "--storage", storage) == 0
    (t,) = trials_of(storage, "posthoc")
    assert t.state == "TERMINATED" and sorted(t.points) == [64, 128]
    assert {f"{M}_ema0.07", f"{M}_ema0.15", "rkid32_ddim10_ema0.07"} <= set(t.points[128])
    snaps = phema.list_snapshots(os.path.join(t.dir, "p2", "ema_snapshots"))  # uploaded once each, when taken
    assert [n for n, _ in snaps] == [32, 64, 96, 128]
    # and the node's own copies (beside the trial's working folder in Ray's session) are gone with the trial
    # (any of Ray's sessions: each xdist worker has its own; the trial's folder name holds its id)
    work = glob.glob(f"/tmp/ray/session_*/artifacts/*/posthoc/working_dirs/{os.path.basename(t.dir)}*")
    assert work and not [w for w in work if w.endswith(".ema_snapshots")], work
    rows = R.group_rows([t], M, 128, 1)
    assert sorted((r.spec, r.ema_label) for r in rows) == sorted(
        (s, e) for s in ("ddim5", "ddim10") for e in ("tracked", "0.07", "0.15"))
    capsys.readouterr()
    assert sweep(ray_session, "best", "posthoc", "--storage", storage) == 0
    out = capsys.readouterr().out
    header = next(x for x in out.splitlines() if x.startswith("| config"))
    assert "| ema " in header and "optimistic" in out and "tracked" in out
    notes = [x for x in out.splitlines() if x.startswith("note: ") and "--export" in x]  # where the row's EMA is
    assert len(notes) == (rows[0].ema is not None), out
    assert sweep(ray_session, "compare", "posthoc", "--storage", storage) == 0
    assert f"{M}_ema0.07" in capsys.readouterr().out
    assert sweep(ray_session, "report", "posthoc", "--storage", storage, "--no-mlflow") == 0
    md = open(os.path.join(storage, "posthoc", "report", "report.md")).read()
    assert f"### {M}_ema0.07" in md and "Results per sampling spec and EMA" in md
    c, runs = mlflow_runs(storage, "posthoc")
    kid = next(x for x in runs if x.data.tags.get("p2sweep.role") == "trial")
    assert f"{M}_ema0.15" in kid.data.metrics
    # the export of an EMA row: its yaml names the sigma_rel, its weights load strictly
    row = next(r for r in rows if r.ema == 0.07 and r.spec == "ddim5")
    from sweeps.record.meta import load_meta

    meta = load_meta("posthoc", storage)
    text = R.best_export_yaml(meta, row, [t])
    assert "sigma_rel 0.07" in text and yaml.safe_load(text)["eval"]["ema_sigma_rels"] == [0.07]
    w = R.export_ema_weights(row, [t], R.ema_weights_path(str(tmp_path / "best.yaml"), row))
    assert w.endswith("best_ema0.07_000000000128.pt")
    sd = torch.load(w, weights_only=True)
    model = model_from_config(trial_config(meta.base, t.config))
    model.load_state_dict(sd, strict=True)
    want = phema.reconstruct(phema.load_snapshots(os.path.join(t.dir, "p2", "ema_snapshots")), 0.07, 128)
    assert all(torch.equal(sd[k], want[k].float()) for k in want)


def test_ema_choose_on_gives_one_chosen_row_per_spec_and_exports_each_seeds_choice(tmp_path, ray_session, capsys):
    """eval.ema_choose_on through Ray, 2 seeds: the other EMAs get the cheap metric only; `best` has a `chosen` row
    per spec listing each seed's choice; `best --export` of it names and writes the first seed's sigma_rel."""
    from sweeps.record.meta import load_meta
    from sweeps.results import trials as R

    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    base["train"].update(total_images=64, ema={"type": "power", "sigma_rels": [0.05, 0.10],
                                               "snapshot_every_images": 32})
    base["eval"].update(ema_sigma_rels=[0.07, 0.15], ema_choose_on="rkid16_ddim5")
    p = sweep_file(str(tmp_path), "chosen", base=base, space={"diffusion.p2_gamma": {"grid": [1.0]}},
                   scheduler={"type": "none"}, seeds=[0, 1])
    storage = str(tmp_path / "store")
    assert sweep(ray_session, "run", p, "--storage", storage) == 0
    ts = sorted(trials_of(storage, "chosen"), key=lambda t: t.seed)
    for t in ts:
        ev = t.points[64]
        cheap = {0.10: ev["rkid16_ddim5"], 0.07: ev["rkid16_ddim5_ema0.07"], 0.15: ev["rkid16_ddim5_ema0.15"]}
        assert ev["ema_chosen"] == min(cheap, key=lambda s: (cheap[s], s != 0.10))
        assert f"{M}_emachosen" in ev and "rkid32_ddim10_emachosen" in ev and f"{M}_ema0.07" not in ev
    rows = R.group_rows(ts, M, 64, 2)
    assert sorted((r.spec, r.ema_label.split(" ")[0]) for r in rows) == sorted(
        (s, e) for s in ("ddim5", "ddim10") for e in ("tracked", "chosen"))
    row = next(r for r in rows if r.ema == "chosen" and r.spec == "ddim5")
    picks = [None if t.points[64]["ema_chosen_tracked"] else t.points[64]["ema_chosen"] for t in ts]
    assert row.chosen == picks and row.n == 2
    assert row.values == [t.points[64][f"{M}_emachosen"] for t in ts]
    capsys.readouterr()
    assert sweep(ray_session, "best", "chosen", "--storage", storage) == 0
    names = ["tracked" if s is None else f"{s:g}" for s in picks]
    assert f"chosen ({names[0]}, {names[1]})" in capsys.readouterr().out
    text = R.best_export_yaml(load_meta("chosen", storage), row, ts)
    cfg = yaml.safe_load(text)["eval"]
    assert cfg["ema_sigma_rels"] == ([] if picks[0] is None else [picks[0]]) and cfg["ema_choose_on"] == ""
    assert f"(chosen there by rkid16_ddim5 for seed 0; the seeds chose {names[0]}, {names[1]})" in text
    if picks[0] is not None:  # the tracked EMA's weights are the checkpoint's: nothing to reconstruct
        w = R.export_ema_weights(row, ts, R.ema_weights_path(str(tmp_path / "best.yaml"), row))
        assert w.endswith(f"best_ema{picks[0]:.2f}_000000000064.pt")


def test_a_chosen_row_whose_first_seed_kept_the_tracked_ema_exports_no_reconstruction():
    """The tracked EMA's weights are the checkpoint's: the export names it and lists no post-hoc EMA."""
    from types import SimpleNamespace

    from sweeps.results import trials as R

    base = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))["base"]
    base["train"]["ema"] = {"type": "power", "sigma_rels": [0.05, 0.10], "snapshot_every_images": 32}
    base["eval"].update(ema_sigma_rels=[0.07], ema_choose_on="rkid16_ddim5")
    t = SimpleNamespace(trial_id="t0", seed=0, config={"train.seed": 0})
    meta = SimpleNamespace(base=base, metric=M, name="s")
    row = R.Row(group=0, config={}, spec="ddim5", metric=f"{M}_emachosen", images_seen=64, values=[0.2, 0.3],
                seeds=[0, 1], trials=["t0", "t1"], checkpoints=["", ""], seeds_expected=2, full_length=True,
                mean=0.25, ema="chosen", chosen=[None, 0.07])
    assert row.sigma_rel is None and row.ema_label == "chosen (tracked, 0.07)"
    text = R.best_export_yaml(meta, row, [t])
    assert "The row's EMA: the tracked one (chosen there by rkid16_ddim5 for seed 0; the seeds chose tracked, 0.07)" in text
    assert "reconstructed" not in text and "sigma_rel" not in text.split("\n# This is")[0]
    ev = yaml.safe_load(text)["eval"]
    assert ev["ema_sigma_rels"] == [] and ev["ema_choose_on"] == ""
    row.chosen = [0.07, None]
    text = R.best_export_yaml(meta, row, [t])
    assert "The row's EMA: sigma_rel 0.07 (chosen there by rkid16_ddim5" in text and "reconstructed post hoc" in text
    assert yaml.safe_load(text)["eval"]["ema_sigma_rels"] == [0.07]

