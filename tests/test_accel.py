import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import tiny_cfg
from p2core import accel
from p2core.config import config_from_dict
from p2core.errors import UserError
from p2core.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_switches_take_true_false_or_auto_and_name_the_bad_key():
    assert config_from_dict({}).train.bf16 == "auto" and config_from_dict({}).train.channels_last is False
    for v in (True, False, "auto"):
        assert config_from_dict({"train": {"bf16": v}}).train.bf16 == v
    with pytest.raises(UserError, match="train.channels_last: expected true/false"):
        config_from_dict({"train": {"channels_last": "auto"}})
    with pytest.raises(UserError) as e:
        config_from_dict({"train": {"bf16": "yes"}})
    assert str(e.value) == "train.bf16: expected true, false or auto, got 'yes'"
    assert config_from_dict({"train": {"bf16": False}}).to_dict()["train"]["bf16"] is False  # YAML round trip


def test_cpu_bf16_units_are_read_from_the_cpu_flags(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def with_cpuinfo(flags):
        f = tmp_path / "cpuinfo"
        f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(f if p == "/proc/cpuinfo" else p, *a, **k))
        accel.cpu_has_bf16_units.cache_clear()
        try:
            return accel.cpu_has_bf16_units()
        finally:
            accel.cpu_has_bf16_units.cache_clear()

    assert with_cpuinfo("fpu sse avx512f amx_bf16 amx_tile") is True
    assert with_cpuinfo("fpu sse avx512f avx512_bf16") is True
    assert with_cpuinfo("fpu sse avx2 avx512f") is False


def test_auto_resolves_per_device(monkeypatch):
    assert accel.use_bf16(accel.AUTO, CUDA) is True
    for units in (True, False):
        monkeypatch.setattr(accel, "cpu_has_bf16_units", lambda u=units: u)
        assert accel.use_bf16(accel.AUTO, CPU) is units
    assert accel.use_bf16(False, CUDA) is False and accel.use_bf16(True, CPU) is True


def test_fused_adamw_follows_the_adamw_update():
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 8)
    b = torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    fused = accel.make_optimizer(a.parameters(), 1e-2, 0.01, CPU)
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    # closed form of the first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> p -= lr (wd p + sign(g)) (eps~0)
    x = torch.randn(4, 16)
    p0 = a.weight.detach().clone()
    a(x).square().sum().backward()
    g = a.weight.grad.clone()
    fused.step()
    expect = p0 * (1 - 1e-2 * 0.01) - 1e-2 * g / (g.abs() + 1e-8)
    assert torch.allclose(a.weight, expect, atol=1e-6)
    fused.zero_grad()
    b(x).square().sum().backward()
    plain.step()
    plain.zero_grad()
    for _ in range(5):
        x = torch.randn(4, 16)
        for m, o in ((a, fused), (b, plain)):
            m(x).square().sum().backward()
            o.step()
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bf16,cl", [(False, False), (True, True)])
def test_trainer_runs_each_setting_and_saves_plain_official_names(tmp_path, bf16, cl):
    cfg = tiny_cfg(train={"bf16": bf16, "channels_last": cl, "total_images": 32})
    tr = Trainer.from_config(cfg, str(tmp_path), progress=False)
    assert (tr.bf16, tr.channels_last) == (bf16, cl)
    tr.run()
    assert torch.isfinite(torch.tensor([r["loss"] for r in map(json.loads, open(tr.metrics_path)) if "loss" in r])).all()
    keys = set(tr.state()["model"])
    assert "time_embed.0.weight" in keys and not any(k.startswith("_orig_mod") for k in keys)
    if cl:
        w = tr.model.middle_block[0].in_layers[2].weight  # C > 1: the two layouts differ
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_train_step_bench_runs_ours_alone_and_rejects_a_bad_official_path(tmp_path):
    bench = os.path.join(ROOT, "bench", "train_step.py")
    r = subprocess.run([sys.executable, bench, "--only", "cpu_preset", "--repeats", "1", "--threads", "1", "--batch", "4",
                        "--bf16", "off"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["cpu_preset_params"] == 1191522 and out["official"] is False and out["cpu_preset_train_step_s"] > 0
    assert not any("official" in k for k in out if k.startswith("cpu_preset"))
    r = subprocess.run([sys.executable, bench, "--official", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no guided_diffusion folder" in r.stderr
