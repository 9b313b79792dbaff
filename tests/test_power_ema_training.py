"""Training with the power-function EMA (train.ema.type power): config, the snapshot event, snapshot files, exact
resume, and a post-hoc reconstruction from a real (tiny) run. The math itself is tested in test_phema.py."""
import math
import os

import pytest
import torch
import yaml

from helpers import crash_once_at, tiny_cfg
from p2core import checkpoint as ck
from p2core import phema
from p2core.config import config_from_dict, load_config
from p2core.ema import EMA, PowerEMAModel
from p2core.errors import UserError
from p2core.plan import CHECKPOINT, EVALUATE, EVENT_KINDS, LOG, SAMPLE, SNAPSHOT, Schedule, describe_training
from p2core.trainer import Trainer, read_jsonl

POWER = {"type": "power", "sigma_rels": [0.05, 0.10]}


def power_cfg(ema=None, **train):
    return tiny_cfg(train={**train, "ema": {**POWER, **(ema or {})}})


def losses(path):
    return [(r["images_seen"], r["loss"]) for r in read_jsonl(os.path.join(path, "metrics.jsonl"))
            if r["kind"] == "train"]


def snap_names(run):
    return [os.path.basename(p) for _, p in phema.list_snapshots(os.path.join(run, "ema_snapshots"))]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def flat(sd, keys=None):
    return torch.cat([sd[k].double().reshape(-1) for k in (keys or sd)])


# ------------------------------------------------------------------------------------------------------- config
def test_ema_config_default_is_classic_and_power_parses():
    c = tiny_cfg()
    assert c.train.ema.type == "classic" and c.train.ema.sigma_rels == [0.05, 0.10]
    assert c.train.ema.snapshot_every_images == 0 and c.train.ema.snapshot_dtype == "float16"
    assert type(c.train.ema_rate) is float and c.train.ema.snapshot_every(128) == 0
    assert Schedule.from_config(c).snapshot_every == 0
    # a config without the section (every config and checkpoint before it) loads to the same defaults
    old = yaml.safe_load(c.to_yaml())
    del old["train"]["ema"]
    assert config_from_dict(old) == c
    p = power_cfg({"sigma_rels": [0.05, 0.1, 0.2], "snapshot_dtype": "bfloat16"})
    assert p.train.ema.sigma_rels == [0.05, 0.1, 0.2] and all(type(s) is float for s in p.train.ema.sigma_rels)
    assert p.train.ema.snapshot_every(p.train.checkpoint_every_images) == 128  # 0: every checkpoint point
    assert config_from_dict(yaml.safe_load(p.to_yaml())) == p
    assert p.flat()["train.ema.type"] == "power"
    # --set / search-space spellings: a comma string, a scalar, ints and YAML's "1e-1" strings
    for v in ("0.05,0.1", [0.05, "1e-1"]):
        assert load_config(data={}, overrides={"train.ema.sigma_rels": v}).train.ema.sigma_rels == [0.05, 0.1]
    assert load_config(overrides={"train.ema.sigma_rels": 0.1}).train.ema.sigma_rels == [0.1]
    assert power_cfg({"snapshot_every_images": 48}).train.ema.snapshot_every(128) == 48


@pytest.mark.parametrize("ema, train, msg", [
    ({"type": "karras"}, {}, r"^train\.ema\.type: unknown EMA type 'karras'"),
    ({"sigma_rels": [0.05, 0.3]}, {}, r"^train\.ema\.sigma_rels: each must be in \(0, 0\.3\), got 0\.3$"),
    ({"sigma_rels": [0.0]}, {}, r"^train\.ema\.sigma_rels: each must be in"),
    ({"sigma_rels": []}, {}, r"^train\.ema\.sigma_rels: must list at least one"),
    ({"sigma_rels": [0.1, 0.1]}, {}, r"^train\.ema\.sigma_rels: duplicate"),
    ({"sigma_rels": ["wide"]}, {}, r"^train\.ema\.sigma_rels: expected a number, got 'wide'$"),
    ({"sigma_rels": {"a": 1}}, {}, r"^train\.ema\.sigma_rels: expected a list of numbers"),
    ({"snapshot_dtype": "float64"}, {}, r"^train\.ema\.snapshot_dtype: unknown dtype 'float64'"),
    ({"snapshot_every_images": -1}, {}, r"^train\.ema\.snapshot_every_images: must be >= 0$"),
    ({}, {"checkpoint_every_images": 0}, r"^train\.ema\.snapshot_every_images: must be > 0 with train\.ema\.type"),
    ({"snapshots": 3}, {}, r"^train\.ema\.snapshots: unknown config key$"),
])
def test_ema_config_errors_name_the_dotted_key(ema, train, msg):
    with pytest.raises(UserError, match=msg):
        power_cfg(ema, **train)


def test_classic_ema_rate_stays_one_float():
    # guided-diffusion's comma list of classic rates is not accepted: ema_rate keeps its type (a float); the error
    # says what to use instead
    with pytest.raises(UserError, match=r"^train\.ema_rate: '0\.9999,0\.999': a comma list of classic rates .*"
                                        r"eval\.ema_sigma_rels"):
        tiny_cfg(train={"ema_rate": "0.9999,0.999"})
    assert tiny_cfg(train={"ema_rate": "0.999"}).train.ema_rate == 0.999
    # a classic EMA ignores the power keys, and a power EMA needs no snapshot interval of its own
    assert tiny_cfg(train={"checkpoint_every_images": 0}).train.ema.snapshot_every(0) == 0


# ----------------------------------------------------------------------------------------------------- schedule
def timeline(schedule, batch, start=0):
    out, images = [], start
    while images < schedule.total_images:
        before, images = images, min(images + batch, schedule.total_images)
        due = schedule.due(before, images)
        if due:
            out.append((images, set(due)))
    return out


def test_schedule_snapshot_event():
    s = Schedule(100, log_every=10, checkpoint_every=40, eval_points=(100,), snapshot_every=30)
    assert s.kinds == set(EVENT_KINDS) | {SNAPSHOT}
    assert timeline(s, 16) == [
        (16, {LOG}),
        (32, {LOG, SNAPSHOT}),            # 20 and 30: one log, the snapshot at 30
        (48, {LOG, CHECKPOINT}),          # 40
        (64, {LOG, SNAPSHOT}),            # 50, 60
        (80, {LOG, CHECKPOINT}),          # 70, 80
        (96, {LOG, SNAPSHOT}),            # 90
        (100, s.kinds),                   # the end: every kind, snapshots included
    ]
    assert s.due(89, 90) == {LOG, SNAPSHOT} and s.due(90, 91) == frozenset()
    assert s.due(0, 60) == {LOG, SNAPSHOT, CHECKPOINT}  # two snapshot points in one step: one snapshot
    assert timeline(s, 16, start=48) == timeline(s, 16)[3:]  # a resumed run continues the same snapshots
    # snapshot_every 0: no snapshots at all, not even at the end (a classic EMA)
    off = Schedule(100, log_every=10, eval_points=(100,))
    assert off.kinds == set(EVENT_KINDS) and off.due(90, 100) == set(EVENT_KINDS)
    assert all(SNAPSHOT not in d for _, d in timeline(off, 16))
    assert {SAMPLE, EVALUATE} <= off.due(96, 100)


def test_schedule_from_config_derives_the_snapshot_interval():
    assert Schedule.from_config(power_cfg()) == Schedule(256, 32, 0, 128, (256,), 128)
    assert Schedule.from_config(power_cfg({"snapshot_every_images": 48})).snapshot_every == 48
    assert Schedule.from_config(tiny_cfg(train={"ema": {"snapshot_every_images": 48}})).snapshot_every == 0
    assert "power EMA [0.05, 0.1]: 6 snapshot(s) (float16) every 48 images" in describe_training(
        power_cfg({"snapshot_every_images": 48}))
    assert "power EMA" not in describe_training(tiny_cfg())


def test_a_classic_ema_with_a_snapshot_schedule_is_refused(tmp_path):
    base = Trainer.from_config(tiny_cfg(), str(tmp_path / "base"), progress=False)
    with pytest.raises(ValueError, match="snapshots"):
        Trainer(base.model, base.diffusion, base.data, base.ema, base.opt, None, Schedule(32, snapshot_every=16),
                cfg=base.cfg, out_dir=str(tmp_path / "run"), device=base.device, progress=False)


# --------------------------------------------------------------------------------------------- training and resume
# 6 steps of 16: checkpoints at 48 and 96, snapshots every 16; the crash in the step to 80 leaves the snapshot at
# 64 written after the last checkpoint
SHORT = {"total_images": 96, "checkpoint_every_images": 48, "log_every_images": 16}
SNAP16 = {"snapshot_every_images": 16}


def test_power_ema_run_crashed_and_resumed_is_bit_identical(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = power_cfg(SNAP16, **SHORT)
    ta = Trainer.from_config(cfg, a, progress=False)
    assert isinstance(ta.ema, PowerEMAModel) and ta.ema.eval_profile == "0.1"
    ta.run()
    names = [f"snap_{i:012d}.pt" for i in range(16, 97, 16)]
    assert snap_names(a) == names
    crash_once_at(monkeypatch, 80)
    with pytest.raises(RuntimeError, match="injected crash"):
        Trainer.from_config(cfg, b, progress=False).run()
    assert ck.latest_checkpoint(os.path.join(b, "checkpoints")).endswith("ckpt_000000000048.pt")
    assert snap_names(b) == names[:4]                   # 64 was written after the checkpoint at 48
    tb = Trainer.from_config(cfg, b, progress=False, resume=True)
    assert snap_names(b) == names[:3]                   # the resume drops it: the run writes it again
    tb.run()
    la, lb = losses(a), losses(b)
    assert [x for x, _ in la] == [x for x, _ in lb] == list(range(16, 97, 16))
    assert all(math.isclose(x, y, rel_tol=1e-6) for (_, x), (_, y) in zip(la, lb))
    # every snapshot and the final EMA state bit for bit
    assert snap_names(b) == names
    sa, sb = (phema.load_snapshots(os.path.join(run, "ema_snapshots")) for run in (a, b))
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys() == {"0.05", "0.1"}
        for key in x:
            assert {k: v for k, v in x[key].items() if k != "state_dict"} == \
                   {k: v for k, v in y[key].items() if k != "state_dict"}
            assert x[key]["state_dict"].keys() == y[key]["state_dict"].keys()
            assert all(torch.equal(v, y[key]["state_dict"][n]) for n, v in x[key]["state_dict"].items())
    fa, fb = ta.ema.tracker.state_dict(), tb.ema.tracker.state_dict()
    assert (fa["t"], fa["r"], fa["num_updates"]) == (fb["t"], fb["r"], fb["num_updates"]) == (96.0, fa["r"], 6)
    assert all(torch.equal(x, y) for sha, shb in zip(fa["shadows"], fb["shadows"]) for x, y in zip(sha, shb))
    assert all(torch.equal(x, y) for x, y in zip(ta.model.state_dict().values(), tb.model.state_dict().values()))
    # the checkpoint: the tracker's state for the resume, the evaluated profile (0.1) as its `ema` weights
    obj = torch.load(ck.latest_checkpoint(os.path.join(b, "checkpoints")), weights_only=True)
    assert obj["power_ema"]["sigma_rels"] == [0.05, 0.1] and obj["power_ema"]["t"] == 96.0
    prof = tb.ema.tracker.profile_state_dict("0.1")
    assert obj["ema"].keys() == prof.keys() and all(torch.equal(obj["ema"][k], prof[k]) for k in prof)
    assert all(torch.equal(v, prof[k]) for k, v in tb.ema.model.state_dict().items())
    model, _, which = ck.load_model(ck.latest_checkpoint(os.path.join(b, "checkpoints")))
    assert which == "ema" and all(torch.equal(v, prof[k]) for k, v in model.state_dict().items())
    assert not [f for f in os.listdir(os.path.join(b, "ema_snapshots")) if f.startswith(".tmp-")]


def test_a_resume_names_the_snapshots_it_lacks(tmp_path, monkeypatch, capsys):
    """The checkpoint lists the snapshots taken up to it; a resume where one is gone (a run continued on a machine
    that never got it) says which, in one line, and goes on."""
    b = str(tmp_path / "b")
    cfg = power_cfg(SNAP16, **SHORT)
    crash_once_at(monkeypatch, 80)
    with pytest.raises(RuntimeError, match="injected crash"):
        Trainer.from_config(cfg, b, progress=False).run()
    path = ck.latest_checkpoint(os.path.join(b, "checkpoints"))
    assert torch.load(path, weights_only=True)["snapshot_times"] == [16, 32, 48]
    assert Trainer.from_config(cfg, b, progress=False, resume=True).missing_snapshots == []
    capsys.readouterr()
    os.unlink(phema.snapshot_path(os.path.join(b, "ema_snapshots"), 32))
    tb = Trainer.from_config(cfg, b, progress=False, resume=True)
    assert tb.missing_snapshots == [32]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resumed without 1 of its EMA snapshots (at 32 images" in err[0], err


def test_ema_type_must_match_the_checkpoint_on_resume(tmp_path):
    Trainer.from_config(tiny_cfg(train={"total_images": 16}), str(tmp_path / "c"), progress=False).run()
    Trainer.from_config(power_cfg(total_images=16), str(tmp_path / "p"), progress=False).run()
    classic = ck.latest_checkpoint(str(tmp_path / "c" / "checkpoints"))
    power = ck.latest_checkpoint(str(tmp_path / "p" / "checkpoints"))
    with pytest.raises(UserError, match="checkpoint has a classic EMA, train.ema.type is power"):
        Trainer.from_config(power_cfg(), str(tmp_path / "x"), progress=False, resume_from=classic)
    with pytest.raises(UserError, match="checkpoint has a power EMA, train.ema.type is classic"):
        Trainer.from_config(tiny_cfg(), str(tmp_path / "y"), progress=False, resume_from=power)
    with pytest.raises(UserError, match="train.ema: profiles differ"):
        Trainer.from_config(power_cfg({"sigma_rels": [0.05, 0.2]}), str(tmp_path / "z"), progress=False,
                            resume_from=power)
    # a config file's train.ema keys merge into the checkpoint's section key by key
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"train": {"ema": {"snapshot_dtype": "bfloat16"}}}))
    _, cfg, _ = ck.load_model(power, config_file=str(extra))
    assert cfg.train.ema.type == "power" and cfg.train.ema.snapshot_dtype == "bfloat16"


def test_classic_ema_path_is_unchanged(tmp_path):
    tr = Trainer.from_config(tiny_cfg(train={"total_images": 32}), str(tmp_path), progress=False)
    assert type(tr.ema) is EMA and tr.ema.rate == 0.9 and tr.schedule.snapshot_every == 0
    tr.run()
    obj = torch.load(ck.latest_checkpoint(tr.ckpt_dir), weights_only=True)
    assert "power_ema" not in obj and not os.path.exists(os.path.join(tmp_path, "ema_snapshots"))


# --------------------------------------------------------------------------------------------- reconstruction
def test_reconstruction_from_a_training_run(tmp_path):
    out = str(tmp_path / "run")
    tr = Trainer.from_config(power_cfg(SNAP16), out, progress=False)   # 256 images: 16 snapshots of 2 profiles
    tr.run()
    folder = os.path.join(out, "ema_snapshots")
    snaps = phema.load_snapshots(folder)
    T = 256
    assert [s["0.05"]["t"] for s in snaps] == [float(i) for i in range(16, T + 1, 16)]
    # the files: weights_only-loadable, fp16, 2 bytes per parameter and profile
    n_params = sum(p.numel() for p in tr.model.parameters())
    obj = torch.load(phema.snapshot_path(folder, T), weights_only=True)
    assert obj["format"] == phema.SNAPSHOT_FORMAT and obj["images_seen"] == T
    for key in ("0.05", "0.1"):
        sd = obj["profiles"][key]["state_dict"]
        assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
        assert sum(v.numel() * v.element_size() for v in sd.values()) == 2 * n_params
    size = os.path.getsize(phema.snapshot_path(folder, T))
    n_tensors = sum(len(obj["profiles"][k]["state_dict"]) for k in obj["profiles"])
    # 2 profiles, plus torch.save's zip container: measured 3,095,359 bytes for 755,298 parameters (3,021,192
    # bytes of fp16 tensors in 2 x 128 tensors: 290 bytes of overhead a tensor)
    assert 4 * n_params < size < 4 * n_params + 512 * n_tensors, (size, n_params, n_tensors)
    print(f"\ntiny run: {n_params} parameters, {n_tensors} tensors, snapshot file {size} bytes "
          f"(2 fp16 profiles = {4 * n_params})")

    keys = list(tr.model.state_dict().keys())
    rec = phema.reconstruct(snaps, 0.075, at_images=T)
    tr.model.load_state_dict(rec, strict=True)
    r, a, b = flat(rec, keys), flat(snaps[-1]["0.05"]["state_dict"], keys), flat(snaps[-1]["0.1"]["state_dict"], keys)
    # between the two tracked profiles in L2: closer to each than they are to each other, its projection on the
    # segment from one to the other well inside it. Measured: projection at 0.49 of the segment, distances 0.49 and
    # 0.51 of |p0.10 - p0.05| (itself 0.5% of the weights' norm in this tiny run)
    ab = (b - a).norm()
    lam = float((r - a) @ (b - a) / ab ** 2)
    assert (r - a).norm() < 0.7 * ab and (r - b).norm() < 0.7 * ab and 0.3 < lam < 0.7, \
        (lam, float((r - a).norm() / ab), float((r - b).norm() / ab))
    # a tracked profile at a snapshot point is reconstructed as (nearly only) its own snapshot: measured 1.1e-4 and
    # 2.1e-4 of |p0.10 - p0.05| (for scale: the fp16 rounding of a snapshot is 4% of it here)
    for key in ("0.05", "0.1"):
        own = flat(phema.reconstruct(snaps, float(key), T), keys)
        assert float((own - flat(snaps[-1][key]["state_dict"], keys)).norm()) < 1e-3 * float(ab), key
    # only the snapshots up to a point are read, and they give the same reconstruction there
    early = phema.load_snapshots(folder, upto_images=128)
    assert len(early) == 8 and early[-1]["0.1"]["t"] == 128.0
    mid = phema.reconstruct(early, 0.075, at_images=128)
    assert all(torch.equal(v, phema.reconstruct(snaps, 0.075, at_images=128)[k]) for k, v in mid.items())
    with pytest.raises(ValueError, match="no snapshot"):
        phema.reconstruct(phema.load_snapshots(folder, upto_images=15), 0.075, at_images=15)
    # several targets in one pass over the snapshots: each the same tensors as that target alone (no mix-up)
    many = phema.reconstruct_many(snaps, [0.075, 0.05, phema.ClassicRate(0.999, 16)], T)
    for target, got in zip([0.075, 0.05, phema.ClassicRate(0.999, 16)], many):
        want = phema.reconstruct(snaps, target, T)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------- post-hoc EMAs at evaluations
def test_eval_ema_sigma_rels_needs_a_power_ema_and_valid_widths():
    with pytest.raises(UserError, match="eval.ema_sigma_rels: needs train.ema.type: power"):
        tiny_cfg(eval={"ema_sigma_rels": [0.1]})
    for bad, msg in (([0.3], "each must be in"), ([0.1, 0.10], "duplicate"), ([0.12345], "at most 4 decimals")):
        with pytest.raises(UserError, match=f"eval.ema_sigma_rels: {msg}"):
            tiny_cfg(train={"ema": POWER}, eval={"ema_sigma_rels": bad})
    assert power_cfg().eval.ema_sigma_rels == []


def test_eval_ema_sigma_rels_evaluates_each_reconstruction_from_the_same_noise(tmp_path):
    """Evaluations at 48 (between regular snapshots: one is taken there for the evaluation), 96 and 128 (snapshot
    points) score the tracked profile (0.10) and the reconstructions at 0.10 and 0.07, from float32 snapshots; each
    score is that of the reconstruction from the files up to its point (what `best --export` writes)."""
    out = str(tmp_path / "run")
    cfg = tiny_cfg(train={"total_images": 128, "eval_every_images": 48,
                          "ema": {**POWER, "snapshot_every_images": 32, "snapshot_dtype": "float32"}},
                   eval={"enabled": True, "ema_sigma_rels": [0.10, 0.07]})
    tr = Trainer.from_config(cfg, out, progress=False)
    tr.run()
    evals = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "eval"]
    assert [e["images_seen"] for e in evals] == [48, 96, 128]
    assert [n for n, _ in phema.list_snapshots(os.path.join(out, "ema_snapshots"))] == [32, 48, 64, 96, 128]
    from p2core import plan

    assert plan.generated_images(cfg, 3) == 3 * plan.generated_images(tiny_cfg(eval={"enabled": True}), 3)
    m = "rkid16_ddim5"
    for e in evals:
        assert {f"{m}_ema0.10", f"{m}_ema0.07", "rfid16_ddim5_ema0.07", "ema_eval_seconds"} <= set(e), sorted(e)
        # the tracked profile reconstructed from itself: the same weights up to the solve's ridge, sampled from
        # the same noise, so the same score; 0.07 is another model. Measured |score - tracked| for 0.10 / 0.07:
        # 3.9e-6 / 1.1e-4 at 96, 0 / 4.5e-3 at 128 (KIDs ~1.15)
        d10, d07 = abs(e[f"{m}_ema0.10"] - e[m]), abs(e[f"{m}_ema0.07"] - e[m])
        assert d10 < 2e-5 and d07 > 10 * d10, (e["images_seen"], d10, d07)
    # each 0.07 score is that of the reconstruction from the files alone up to its point, scored afresh
    model = tr.ema.model
    for e in (evals[0], evals[-1]):
        t = e["images_seen"]
        snaps = phema.load_snapshots(os.path.join(out, "ema_snapshots"), upto_images=t)
        model.load_state_dict(phema.reconstruct(snaps, 0.07, t))
        again = tr.evaluator.evaluate_model(model, ["ddim5"], seed=cfg.eval.seed)
        assert again[m] == pytest.approx(e[f"{m}_ema0.07"], rel=1e-6), t


class ScriptedEvaluator:
    """An evaluator whose cheap metric `cheap` takes its values from `script` in call order, and whose every other
    metric is a fingerprint of the weights scored (so a test can tell which EMA was evaluated)."""

    def __init__(self, cheap, script):
        self.cheap, self.script, self.calls = cheap, list(script), []

    def configured_metrics(self, specs):
        return [f"r{k}16_{s}" for s in specs for k in ("kid", "fid")]

    def evaluate_model(self, model, specs, seed=0, extra_metrics=()):
        from p2core.metrics import parse_metric_name

        self.calls.append((list(specs), list(extra_metrics)))
        fp = fingerprint(model.state_dict())
        out = {m: fp for m in self.configured_metrics(specs)}
        out.update({m: self.script.pop(0) if m == self.cheap else fp for m in extra_metrics})
        for m in list(out):  # images generated per spec, as the real evaluator reports them
            _, n, spec = parse_metric_name(m)
            out[f"gen_images_{spec}"] = max(n, out.get(f"gen_images_{spec}", 0))
        return {**out, "ref_samples": 32}


def fingerprint(sd):
    return float(sum(v.double().mul(i + 1).sum() for i, v in enumerate(sd.values()) if v.is_floating_point()))


def test_ema_choose_on_scores_every_ema_cheaply_then_the_chosen_one_fully(tmp_path):
    """eval.ema_choose_on: at each point the tracked EMA (0.10) and each listed sigma_rel get the cheap metric only;
    the lowest (a tie keeps the tracked one) gets the point's metrics, under `_emachosen`; these are the metrics of
    the reconstruction from the files up to that point (or the tracked values when it wins)."""
    out, cheap = str(tmp_path / "run"), "rkid8_ddim5"
    cfg = tiny_cfg(train={"total_images": 96, "eval_every_images": 32,
                          "ema": {**POWER, "snapshot_every_images": 16, "snapshot_dtype": "float32"}},
                   eval={"enabled": True, "ema_sigma_rels": [0.07, 0.15], "ema_choose_on": "rkid8_ddim5"})
    tr = Trainer.from_config(cfg, out, progress=False)
    # (tracked, 0.07, 0.15) at 32, 64, 96: 0.07 wins; a tie with the tracked one keeps it; 0.15 wins
    tr.evaluator = ScriptedEvaluator(cheap, [0.5, 0.4, 0.6, 0.3, 0.3, 0.9, 0.5, 0.7, 0.2])
    tr.run()
    evals = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "eval"]
    assert [e["images_seen"] for e in evals] == [32, 64, 96]
    assert [e["ema_chosen"] for e in evals] == [0.07, 0.10, 0.15]
    assert [(e[cheap], e[f"{cheap}_ema0.07"], e[f"{cheap}_ema0.15"]) for e in evals] == [
        (0.5, 0.4, 0.6), (0.3, 0.3, 0.9), (0.5, 0.7, 0.2)]
    # the cheap path: per point the tracked EMA's evaluation (its cheap metric with it), 2 cheap ones, and one
    # evaluation more only where another EMA won
    three = [([], [cheap])] * 3  # the tracked EMA's cheap score from as many images (8) as the others'
    assert tr.evaluator.calls == ([(["ddim5"], [])] + three + [(["ddim5"], [])] + [(["ddim5"], [])] + three
                                  + [(["ddim5"], [])] + three + [(["ddim5"], [])])
    assert [e["ema_chosen_tracked"] for e in evals] == [0.0, 1.0, 0.0]
    assert all(e["choose_gen_images_ddim5"] == 8 and e["gen_images_ddim5"] == 16 for e in evals)
    for e in evals:
        assert not any(k.startswith("rfid16_ddim5_ema0") or k.startswith("rkid16_ddim5_ema0") for k in e), e
        assert f"{cheap}_emachosen" not in e  # only the point's own metrics for the chosen EMA
        t = e["images_seen"]
        if e["ema_chosen"] == 0.10:
            want = e["rkid16_ddim5"]
        else:
            snaps = phema.load_snapshots(os.path.join(out, "ema_snapshots"), upto_images=t)
            want = fingerprint(phema.reconstruct(snaps, e["ema_chosen"], t))
            assert want != pytest.approx(e["rkid16_ddim5"], rel=1e-6)  # another model than the tracked one
        assert e["rkid16_ddim5_emachosen"] == pytest.approx(want, rel=1e-9)
        assert e["rfid16_ddim5_emachosen"] == e["rkid16_ddim5_emachosen"]
    from p2core import plan

    one = plan.generated_images(tiny_cfg(eval={"enabled": True}), 3)
    assert plan.generated_images(cfg, 3) == 2 * one + 3 * 8 * 3


def test_ema_choose_on_at_a_rung_judged_on_the_cheap_metric_scores_each_ema_once(tmp_path):
    """An ASHA rung whose own metric is the cheap one: the chosen EMA's value is the one it was chosen on."""
    out, cheap = str(tmp_path / "run"), "rkid8_ddim5"
    cfg = tiny_cfg(train={"total_images": 64, "ema": {**POWER, "snapshot_every_images": 16,
                                                      "snapshot_dtype": "float32"}},
                   eval={"enabled": True, "ema_sigma_rels": [0.07, 0.15], "ema_choose_on": cheap})
    tr = Trainer.from_config(cfg, out, progress=False, extra_eval_points=[32], point_metrics={32: [cheap]})
    tr.evaluator = ScriptedEvaluator(cheap, [0.5, 0.4, 0.6, 0.3, 0.3, 0.9])
    tr.run()
    first = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "eval"][0]
    assert first["images_seen"] == 32 and first["ema_chosen"] == 0.07 and first[f"{cheap}_emachosen"] == 0.4
    # at 32 the tracked EMA's rung evaluation is its cheap score (8 images); no 4th call: the value is known
    # at 64 the tie keeps the tracked EMA: nothing more
    assert tr.evaluator.calls == [([], [cheap])] * 3 + [(["ddim5"], [])] + [([], [cheap])] * 3


def test_ema_choose_on_with_the_real_evaluator(tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_cfg(train={"total_images": 64, "ema": {**POWER, "snapshot_every_images": 16}},
                   eval={"enabled": True, "ema_sigma_rels": [0.07], "ema_choose_on": "rkid8_ddim3"})
    Trainer.from_config(cfg, out, progress=False).run()
    e = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "eval"][-1]
    c, s = e["rkid8_ddim3"], e["rkid8_ddim3_ema0.07"]
    assert e["ema_chosen"] == (0.07 if s < c else 0.10)
    if s >= c:
        assert e["rkid16_ddim5_emachosen"] == e["rkid16_ddim5"]
    else:
        assert e["rkid16_ddim5_emachosen"] != e["rkid16_ddim5"]


@pytest.mark.parametrize("ev, msg", [
    ({"ema_choose_on": "rkid8_ddim5"}, "eval.ema_choose_on: needs eval.ema_sigma_rels"),
    ({"ema_sigma_rels": [0.07], "ema_choose_on": "kid8_ddim5"}, "eval.ema_choose_on: kid8_ddim5 needs eval.extractor"),
    ({"ema_sigma_rels": [0.07], "ema_choose_on": "rkid8"}, "eval.ema_choose_on: bad metric name"),
])
def test_ema_choose_on_errors(ev, msg):
    with pytest.raises(UserError, match=msg):
        tiny_cfg(train={"ema": POWER}, eval=ev)
    assert tiny_cfg(train={"ema": POWER}, eval={"ema_sigma_rels": [0.07], "ema_choose_on": "rkid1000_ddim5"}
                    ).eval.ema_choose_on == "rkid1k_ddim5"


def test_ema_metric_names():
    from p2core.metrics import ema_label, is_metric_name, split_ema, with_ema

    assert [ema_label(s) for s in (0.1, 0.05, 0.075, 0.2)] == ["ema0.10", "ema0.05", "ema0.075", "ema0.20"]
    assert with_ema("kid1k_ddim25", 0.1) == "kid1k_ddim25_ema0.10"
    assert split_ema("kid1k_ddim25_ema0.10") == ("kid1k_ddim25", 0.1)
    assert split_ema("kid1k_ddim25") == ("kid1k_ddim25", None)
    assert with_ema("kid1k_ddim25", "chosen") == "kid1k_ddim25_emachosen"
    assert split_ema("kid1k_ddim25_emachosen") == ("kid1k_ddim25", "chosen")
    assert not is_metric_name("kid1k_ddim25_ema0.10")  # the sweep's own metric names keep their meaning


def test_a_fresh_run_in_a_used_folder_starts_its_own_snapshot_series(tmp_path):
    """Snapshots of an earlier run in the same folder (other times, other weights) would enter its reconstructions."""
    out = str(tmp_path / "run")
    Trainer.from_config(power_cfg(SNAP16, total_images=32), out, progress=False).run()
    assert snap_names(out) == [f"snap_{n:012d}.pt" for n in (16, 32)]
    os.rename(phema.snapshot_path(os.path.join(out, "ema_snapshots"), 16),
              phema.snapshot_path(os.path.join(out, "ema_snapshots"), 8))  # a time this run never writes
    Trainer.from_config(power_cfg({"snapshot_every_images": 32}, total_images=32), out, progress=False).run()
    assert snap_names(out) == [f"snap_{32:012d}.pt"]
