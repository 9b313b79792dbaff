import math
import os

import pytest
import torch

from helpers import crash_once_at, tiny_cfg
from p2core import checkpoint as ck
from p2core.ema import EMA
from p2core.errors import Diverged, UserError
from p2core.plan import CHECKPOINT, EVALUATE, EVENT_KINDS, LOG, SAMPLE, Schedule
from p2core.trainer import Trainer, read_jsonl


def losses(path):
    return [(r["images_seen"], r["loss"]) for r in read_jsonl(os.path.join(path, "metrics.jsonl")) if r["kind"] == "train"]


def leftover_temp_files(d):
    """Temp files p2core.atomic leaves when a write dies: mkstemp names `.tmp-XXXXXXXX<ext>`."""
    return [f for f in os.listdir(d) if f.startswith(".tmp-")]


def nan_loss_from(monkeypatch, images):
    """Make the loss NaN from the step that reaches `images` on."""
    real = Trainer.train_step

    def step(self, x):
        out = real(self, x)
        if self.images_seen + x.shape[0] >= images:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Trainer, "train_step", step)


def timeline(schedule, batch, start=0):
    """(images after the step, its due kinds, the evaluation points it answers) for each step with an event, in
    batches of `batch` from `start` to the end (the last batch cut short), as the trainer steps."""
    out, images = [], start
    while images < schedule.total_images:
        before, images = images, min(images + batch, schedule.total_images)
        due = schedule.due(before, images)
        if due:
            out.append((images, set(due), schedule.evals_in(before, images)))
    return out


# log every 10, grids every 25, checkpoints every 40, evaluations at 30, 33 (a rung) and the end; batches of 16
SCHED = Schedule(100, log_every=10, sample_every=25, checkpoint_every=40, eval_points=(30, 33, 100))
ALL = set(EVENT_KINDS)


def test_schedule_fires_each_kind_once_per_step_however_many_points_it_jumps():
    assert timeline(SCHED, 16) == [
        (16, {LOG}, []),                              # 10
        (32, {LOG, SAMPLE, EVALUATE}, [30]),          # 20 and 30 in one step: one log
        (48, {LOG, CHECKPOINT, EVALUATE}, [33]),      # 40; the rung at 33
        (64, {LOG, SAMPLE}, []),                      # 50, 60
        (80, {LOG, SAMPLE, CHECKPOINT}, []),          # 70, 75, 80: a point reached exactly counts
        (96, {LOG}, []),                              # 90
        (100, ALL, [100]),                            # the end, a short batch: every kind
    ]
    # one image a step: each point on its own, nothing in between
    assert SCHED.due(29, 30) == {LOG, EVALUATE} and SCHED.due(30, 31) == frozenset()
    assert SCHED.due(32, 33) == {EVALUATE} and SCHED.evals_in(0, 100) == [30, 33, 100]
    # one batch past two evaluation points answers both with one evaluation (and passes a point of every kind)
    assert SCHED.due(0, 40) == ALL and SCHED.evals_in(0, 40) == [30, 33]


def test_schedule_every_zero_means_only_the_end():
    s = Schedule(50, eval_points=(50,))
    assert timeline(s, 16) == [(50, ALL, [50])]
    assert timeline(Schedule(48, log_every=16, eval_points=(48,)), 16) == [(16, {LOG}, []), (32, {LOG}, []),
                                                                            (48, ALL, [48])]


def test_schedule_resumed_mid_way_continues_the_same_events():
    full = timeline(SCHED, 16)
    assert timeline(SCHED, 16, start=48) == full[3:]  # a checkpoint at a step boundary: the rest of the run
    # from 40 (e.g. a resume with another batch size): nothing at or before 40 fires again
    assert timeline(SCHED, 16, start=40) == [(56, {LOG, SAMPLE}, []), (72, {LOG}, []),
                                             (88, {LOG, SAMPLE, CHECKPOINT}, []), (100, ALL, [100])]
    assert timeline(SCHED, 16, start=100) == []


def test_schedule_from_config():
    cfg = tiny_cfg(train={"eval_every_images": 128, "sample_every_images": 64})
    assert Schedule.from_config(cfg, [48, 300]) == Schedule(256, 32, 64, 128, (48, 128, 256))


def test_snr_phases_one_definition():
    import numpy as np

    from p2core.weighting import SNR_PHASE_BOUNDARIES, SNR_PHASE_NAMES, SNR_PHASES, snr_phase
    from sweeps.results.analysis import PHASE_NAMES

    assert SNR_PHASE_NAMES == PHASE_NAMES == ("coarse", "content", "cleanup") and SNR_PHASE_BOUNDARIES == (1e-2, 1.0)
    assert [(p.low, p.high) for p in SNR_PHASES] == [(0.0, 1e-2), (1e-2, 1.0), (1.0, math.inf)]
    assert snr_phase(np.array([1e-4, 1e-2, 0.5, 1.0, 30.0])).tolist() == [0, 1, 1, 2, 2]  # low edges inclusive


def test_trainer_composed_from_its_parts(tmp_path):
    # the parts of a config-built trainer, run under another schedule: logs at 16 and 32, one evaluation hook
    base = Trainer.from_config(tiny_cfg(), str(tmp_path / "base"), progress=False)
    evals = []

    class Hooks:
        def on_eval(self, tr, rec):
            evals.append((rec["images_seen"], rec["points"]))

    tr = Trainer(base.model, base.diffusion, base.data, base.ema, base.opt, None, Schedule(32, 16, eval_points=(32,)),
                 Hooks(), cfg=base.cfg, out_dir=str(tmp_path / "run"), device=base.device, progress=False)
    assert tr.run() == {"kind": "eval", "images_seen": 32, "points": [32]} and evals == [(32, [32])]
    assert [x for x, _ in losses(tmp_path / "run")] == [16, 32] and tr.step == 2
    assert ck.list_checkpoints(tr.ckpt_dir)[-1].endswith("ckpt_000000000032.pt")


def test_loss_goes_down_on_tiny_synthetic_set(tmp_path):
    cfg = tiny_cfg(train={"total_images": 512})
    Trainer.from_config(cfg, str(tmp_path), progress=False).run()
    ls = [l for _, l in losses(tmp_path)]
    assert sum(ls[-3:]) / 3 < 0.5 * sum(ls[:3]) / 3


def test_ema_update_rule():
    m = torch.nn.Linear(2, 1)
    ema = EMA(m, rate=0.9)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * m.weight)


def test_ema_warmup_rate():
    ema = EMA(torch.nn.Linear(2, 1), rate=0.99, warmup=True)
    assert ema.rate_at(0) == pytest.approx(0.1) and ema.rate_at(90) == pytest.approx(0.91)
    assert ema.rate_at(10_000) == 0.99 and EMA(torch.nn.Linear(2, 1), 0.99).rate_at(0) == 0.99


def test_checkpoint_round_trip_weights_only(tmp_path):
    cfg = tiny_cfg(train={"total_images": 64, "checkpoint_every_images": 32})
    tr = Trainer.from_config(cfg, str(tmp_path), progress=False)
    tr.run()
    path = ck.latest_checkpoint(os.path.join(tmp_path, "checkpoints"))
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == ck.FORMAT and obj["images_seen"] == 64 and "p2_gamma: 1.0" in obj["config_yaml"]
    tr2 = Trainer.from_config(cfg, str(tmp_path / "b"), progress=False, resume_from=path)
    for a, b in zip(tr.model.state_dict().values(), tr2.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(tr.ema.state_dict().values(), tr2.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert tr2.images_seen == 64
    # retention: keep_checkpoints = 2
    assert len(ck.list_checkpoints(os.path.join(tmp_path, "checkpoints"))) == 2
    assert not leftover_temp_files(os.path.join(tmp_path, "checkpoints"))


def test_leftover_check_matches_the_atomic_temp_file_names(tmp_path):
    from p2core.atomic import atomic_write

    seen = []
    atomic_write(str(tmp_path / "ckpt_1.pt"), lambda f: seen.extend(leftover_temp_files(tmp_path)))
    assert len(seen) == 1  # the temp file, while it is being written, is what the check looks for
    assert leftover_temp_files(tmp_path) == [] and os.listdir(tmp_path) == ["ckpt_1.pt"]


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_gives_the_same_loss_sequence(tmp_path, monkeypatch, bf16):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # a quarter of the tiny run (bf16 autocast on CPU is ~10x slower than float32): 4 steps of 16, a checkpoint
    # after the second, a crash in the third
    short = {"bf16": bf16, "total_images": 64, "checkpoint_every_images": 32, "log_every_images": 16}
    Trainer.from_config(tiny_cfg(train=short), a, progress=False).run()
    cfg = tiny_cfg(train=short)
    crash_once_at(monkeypatch, 48)
    with pytest.raises(RuntimeError, match="injected crash"):
        Trainer.from_config(cfg, b, progress=False).run()
    assert ck.latest_checkpoint(os.path.join(b, "checkpoints")).endswith("ckpt_000000000032.pt")
    Trainer.from_config(cfg, b, progress=False, resume=True).run()
    la, lb = losses(a), losses(b)
    assert [x for x, _ in la] == [x for x, _ in lb] == [16, 32, 48, 64]
    assert all(math.isclose(x, y, rel_tol=1e-6) for (_, x), (_, y) in zip(la, lb))


def test_divergence_guard_names_the_image_count(tmp_path, monkeypatch):
    nan_loss_from(monkeypatch, 48)
    with pytest.raises(Diverged) as e:
        Trainer.from_config(tiny_cfg(), str(tmp_path), progress=False).run()
    assert e.value.images_seen == 48 and "48 images" in str(e.value)


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer.from_config(tiny_cfg(), str(tmp_path), progress=False, resume=True)


def test_hooks_and_extra_eval_points(tmp_path):
    seen = {"eval": [], "ckpt": []}

    class Hooks:
        def on_eval(self, tr, rec):
            seen["eval"].append(rec["images_seen"])

        def on_checkpoint(self, tr, path):
            seen["ckpt"].append(os.path.basename(path))

    cfg = tiny_cfg(train={"eval_every_images": 128})
    Trainer.from_config(cfg, str(tmp_path), hooks=Hooks(), extra_eval_points=[48], progress=False).run()
    assert seen["eval"] == [48, 128, 256]
    assert seen["ckpt"] == ["ckpt_000000000128.pt", "ckpt_000000000256.pt"]


def test_eval_points_in_one_step_evaluate_once(tmp_path):
    # an ASHA rung 1 image before the end and the end itself fall inside the last batch: one (final) evaluation
    calls = []

    class Hooks:
        def on_eval(self, tr, rec):
            calls.append((rec["images_seen"], rec["final"]))

    cfg = tiny_cfg(train={"total_images": 32, "batch_size": 16},
                   eval={"enabled": True, "num_samples": 4, "ref_samples": 8, "cache_dir": str(tmp_path / "cache")})
    Trainer.from_config(cfg, str(tmp_path / "run"), hooks=Hooks(), extra_eval_points=[16, 31], progress=False).run()
    assert calls == [(16, False), (32, True)]
    evals = [r for r in read_jsonl(os.path.join(tmp_path, "run", "metrics.jsonl")) if r["kind"] == "eval"]
    assert [r["images_seen"] for r in evals] == [16, 32]


def test_fashion_mnist_missing_is_a_clear_error(tmp_path):
    from p2core.data import load_dataset

    cfg = tiny_cfg(data={"dataset": "fashion_mnist", "path": str(tmp_path)})
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(cfg.data, 16, 1)


def test_fashion_mnist_idx_parsing_and_padding(tmp_path):
    import gzip

    import numpy as np

    from p2core.data import load_dataset

    imgs = (np.arange(3 * 28 * 28) % 256).astype(np.uint8).reshape(3, 28, 28)
    header = (2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + imgs.tobytes())
    cfg = tiny_cfg(data={"dataset": "fashion_mnist", "path": str(tmp_path)})
    arr, key = load_dataset(cfg.data, 32, 1)
    assert arr.shape == (3, 1, 32, 32) and key.startswith("fmnist-")
    assert np.array_equal(arr[:, 0, 2:30, 2:30], imgs) and arr[:, :, :2].sum() == 0
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(UserError):
        load_dataset(cfg.data, 32, 1)


def test_image_folder_is_decoded_once_into_a_cache(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from p2core import data

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    cfg = tiny_cfg(data={"dataset": "folder", "path": str(folder), "cache_dir": str(tmp_path / "cache")})
    calls = []
    real = data.decode_folder
    monkeypatch.setattr(data, "decode_folder", lambda *a, **k: calls.append(1) or real(*a, **k))
    a1, k1 = data.load_dataset(cfg.data, 16, 3)
    a2, k2 = data.load_dataset(cfg.data, 16, 3)
    assert len(calls) == 1 and k1 == k2 and a1.shape == (3, 3, 16, 16) and int(a2[2].max()) == 80
    (folder / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        data.load_dataset(cfg.data, 16, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .png/.jpg"):
        data.load_dataset(tiny_cfg(data={"dataset": "folder", "path": str(empty)}).data, 16, 3)


def test_init_from_p2sweep_and_bare_official_state_dict(tmp_path):
    src = Trainer.from_config(tiny_cfg(train={"total_images": 32}), str(tmp_path / "src"), progress=False)
    src.run()
    path = ck.latest_checkpoint(os.path.join(tmp_path, "src", "checkpoints"))
    t = Trainer.from_config(tiny_cfg(), str(tmp_path / "a"), progress=False, init_from=path)
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), src.model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(t.ema.state_dict().values(), src.ema.state_dict().values()))
    assert t.images_seen == 0  # weights only: a new run
    bare = tmp_path / "ema_0.9999_000032.pt"
    torch.save({"module." + k: v for k, v in src.ema.state_dict().items()}, bare)  # DDP-style official file
    t2 = Trainer.from_config(tiny_cfg(), str(tmp_path / "b"), progress=False, init_from=str(bare))
    assert all(torch.equal(a, b) for a, b in zip(t2.model.state_dict().values(), src.ema.state_dict().values()))
    with pytest.raises(UserError, match="shape"):
        Trainer.from_config(tiny_cfg(model={"num_channels": 64}), str(tmp_path / "c"), progress=False,
                            init_from=str(bare))


def test_no_fault_injection_in_the_trainer():
    from p2core.config import TrainConfig

    assert not {"inject_crash_at_images", "inject_nan_at_images"} & {f for f in vars(TrainConfig())}
    assert not [n for n in dir(Trainer) if "crash" in n]


def test_legacy_fault_injection_keys_are_dropped_only_when_zero(tmp_path):
    import yaml

    from p2core.config import config_from_dict

    cfg = config_from_dict({"train": {"inject_crash_at_images": 0, "inject_nan_at_images": 0, "lr": 3e-4}})
    assert cfg.train.lr == 3e-4 and not hasattr(cfg.train, "inject_crash_at_images")
    with pytest.raises(UserError) as e:
        config_from_dict({"train": {"inject_nan_at_images": 48}})
    assert str(e.value) == "train.inject_nan_at_images: unknown config key"
    # an old checkpoint stores both keys (value 0) in its config_yaml
    src = Trainer.from_config(tiny_cfg(train={"total_images": 16}), str(tmp_path / "src"), progress=False)
    src.run()
    obj = torch.load(ck.latest_checkpoint(str(tmp_path / "src" / "checkpoints")), weights_only=True)
    old = yaml.safe_load(obj["config_yaml"])
    old["train"].update(inject_crash_at_images=0, inject_nan_at_images=0)
    obj["config_yaml"] = yaml.safe_dump(old, sort_keys=False)
    torch.save(obj, tmp_path / "old.pt")
    model, cfg, which = ck.load_model(str(tmp_path / "old.pt"))
    assert cfg == src.cfg and which == "ema"
    old["train"]["inject_crash_at_images"] = 160
    obj["config_yaml"] = yaml.safe_dump(old, sort_keys=False)
    torch.save(obj, tmp_path / "old160.pt")
    with pytest.raises(UserError, match=r"^train.inject_crash_at_images: unknown config key$"):
        ck.load_model(str(tmp_path / "old160.pt"))


def same_weights(model, sd):
    return set(model.state_dict()) == set(sd) and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_load_model_from_p2sweep_checkpoint_and_bare_state_dict(tmp_path):
    import yaml

    src = Trainer.from_config(tiny_cfg(train={"total_images": 32}), str(tmp_path / "src"), progress=False)
    src.run()
    path = ck.latest_checkpoint(str(tmp_path / "src" / "checkpoints"))
    model, cfg, which = ck.load_model(path)
    assert which == "ema" and cfg == src.cfg and same_weights(model, src.ema.model.state_dict())
    assert not model.training and next(model.parameters()).device.type == "cpu"
    model, _, which = ck.load_model(path, prefer_ema=False)
    assert which == "model" and same_weights(model, src.model.state_dict())
    # a config file's sections merge into the checkpoint's key by key, then the dotted overrides
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"eval": {"num_samples": 4}, "metric": ""}))
    _, cfg, _ = ck.load_model(path, config_file=str(extra), overrides={"diffusion.p2_gamma": 0.5})
    assert cfg.eval.num_samples == 4 and cfg.eval.sampling_steps == ["ddim5"] and cfg.eval.extractor == "random"
    assert cfg.diffusion.p2_gamma == 0.5 and cfg.model == src.cfg.model
    # a given cfg is used as it is
    _, cfg, _ = ck.load_model(path, tiny_cfg(eval={"num_samples": 2}))
    assert cfg.eval.num_samples == 2
    # a bare state_dict stores no config: the model comes from the config file
    bare = tmp_path / "ema_0.9999_000032.pt"
    torch.save({"module." + k: v for k, v in src.ema.state_dict().items()}, bare)
    flags = tmp_path / "flags.yaml"
    flags.write_text(src.cfg.to_yaml())
    model, cfg, which = ck.load_model(str(bare), config_file=str(flags))
    assert which == "state_dict" and cfg == src.cfg and same_weights(model, src.ema.model.state_dict())
    with pytest.raises(UserError, match=r"ema_0.9999_000032.pt: tensor .* (missing|shape)"):
        ck.load_model(str(bare))  # default flags build another UNet
    junk = tmp_path / "junk.pt"
    torch.save({"step": 3}, junk)
    with pytest.raises(UserError, match="junk.pt: not a p2sweep checkpoint or a bare state_dict"):
        ck.load_model(str(junk), src.cfg)


def test_trainer_builds_its_diffusion_from_the_config(tmp_path):
    import numpy as np

    from p2core.diffusion import diffusion_from_config

    cfg = tiny_cfg(diffusion={"timestep_respacing": "20", "noise_schedule": "cosine"})
    d = Trainer.from_config(cfg, str(tmp_path), progress=False).diffusion
    ref = diffusion_from_config(cfg.diffusion)
    assert d.num_timesteps == 20 and np.array_equal(d.betas, ref.betas)
    assert np.array_equal(d.loss_weight, ref.loss_weight) and d.learn_sigma and d.rescale_learned_sigmas
