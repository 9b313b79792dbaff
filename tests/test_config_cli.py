import os
import subprocess
import sys

import pytest

from p2core.config import load_config, config_from_dict, parse_set
from p2core.errors import UserError

from helpers import ROOT, run_cli


@pytest.mark.parametrize("preset", ["configs/ffhq256_p2.yaml", "configs/fmnist_cpu.yaml"])
def test_presets_load_and_round_trip(preset):
    cfg = load_config(os.path.join(ROOT, preset))
    again = config_from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.flat()["diffusion.p2_gamma"] == 1.0


def test_paper_preset_values():
    c = load_config(os.path.join(ROOT, "configs/ffhq256_p2.yaml"))
    assert (c.model.image_size, c.model.num_channels, c.model.num_res_blocks, c.model.attention_resolutions,
            c.model.num_head_channels, c.model.resblock_updown, c.model.use_scale_shift_norm, c.model.dropout) == \
        (256, 128, 1, "16", 64, True, True, 0.0)
    assert (c.diffusion.learn_sigma, c.diffusion.rescale_learned_sigmas, c.diffusion.p2_gamma, c.diffusion.p2_k,
            c.diffusion.diffusion_steps) == (True, True, 1.0, 1.0, 1000)
    assert (c.train.lr, c.train.batch_size, c.train.ema_rate) == (2e-5, 8, 0.9999)


def test_overrides_and_types():
    cfg = load_config(os.path.join(ROOT, "configs/fmnist_cpu.yaml"),
                      parse_set(["diffusion.p2_gamma=0.5", "eval.sampling_steps=[ddim25, 50]", "train.lr=1e-3",
                                 "diffusion.timestep_respacing=250"]))
    assert cfg.diffusion.p2_gamma == 0.5 and cfg.eval.sampling_steps == ["ddim25", "50"]
    assert cfg.train.lr == 1e-3 and cfg.diffusion.timestep_respacing == "250"


@pytest.mark.parametrize("data,key", [
    ({"model": {"bogus": 1}}, "model.bogus"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"batch_size": "big"}}, "train.batch_size"),
    ({"diffusion": {"noise_schedule": "quadratic"}}, "diffusion.noise_schedule"),
    ({"diffusion": {"p2_k": -1.0}}, "diffusion.p2_k"),
    ({"diffusion": {"p2_gamma": 1.0, "p2_k": 0.0}}, "diffusion.p2_k"),
    ({"diffusion": {"learn_sigma": "yes"}}, "diffusion.learn_sigma"),
    ({"eval": {"sampling_steps": ["ddim37"]}}, "eval.sampling_steps"),
    ({"model": {"channel_mult": "1,x"}}, "model"),
    ({"metric": "fid10k_250", "eval": {"num_samples": 512}}, "metric"),
    ({"metric": "fidd"}, "metric"),
    ({"train": 3}, "train"),
])
def test_bad_config_names_the_key(data, key):
    with pytest.raises(UserError) as e:
        config_from_dict(data)
    assert str(e.value).startswith(key)


def test_cli_help_is_fast():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout
    # fast because nothing heavy is imported to build the parser (a behaviour, not a wall time)
    r = subprocess.run([sys.executable, "-c", "import sys, sweeps.cli; sweeps.cli.build_parser(); "
                        "print(sorted(m for m in ('torch','ray','mlflow') if m in sys.modules))"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("content,args,needle", [
    (None, [], "no such file"),
    ("model: [1, 2\n", [], "not valid YAML"),
    ("model:\n  bogus: 1\n", [], "model.bogus"),
    ("train:\n  batch_size: 0\n", [], "train.batch_size"),
    ("diffusion:\n  noise_schedule: sqrt\n", [], "diffusion.noise_schedule"),
    ("diffusion:\n  p2_k: -1\n", [], "diffusion.p2_k"),
    ("model: !!python/object/apply:os.system ['echo hacked']\n", [], "not valid YAML"),
    ("{}\n", ["--set", "train.nope=1"], "train.nope"),
])
def test_cli_config_errors_exit_2_with_one_line(tmp_path, content, args, needle):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    r = run_cli("train", str(path), "--out", str(out), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()  # nothing written


def test_cli_dry_run_prints_resolved_config(tmp_path):
    r = run_cli("train", "configs/fmnist_cpu.yaml", "--dry-run", "--set", "diffusion.p2_gamma=0.5",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "p2_gamma: 0.5" in r.stdout and "# plan:" in r.stdout
    assert not (tmp_path / "o").exists()


def test_cli_train_and_sample_for_real(tmp_path):

    from helpers import tiny_cfg

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_cfg(train={"total_images": 64}).to_yaml())
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 0, r.stderr
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    r = run_cli("sample", str(ckpt), "--steps", "ddim5", "--num-samples", "4", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 16
    r = run_cli("sample", str(cfg), "--num-samples", "4")
    assert r.returncode == 2 and "not a" in r.stderr and "Traceback" not in r.stderr
    # a bare state_dict with the flags
    import torch

    obj = torch.load(ckpt, weights_only=True)
    torch.save(obj["ema"], tmp_path / "ema_0.9999_000064.pt")
    r = run_cli("sample", str(tmp_path / "ema_0.9999_000064.pt"), "--config", str(cfg), "--steps", "ddim5",
                "--num-samples", "2", "--out", str(tmp_path / "g2.png"))
    assert r.returncode == 0, r.stderr
    r = run_cli("sample", str(tmp_path / "ema_0.9999_000064.pt"), "--config", str(cfg), "--set",
                "model.num_channels=64", "--num-samples", "2")
    assert r.returncode == 2 and "shape" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_weights_plot_and_paper_mean_weights(tmp_path):
    r = run_cli("weights", "--out", str(tmp_path / "w.png"))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(tmp_path / "w.png").size[0] > 300
    # the printed means match FIELD_NOTES' paper-setting figures (k = 1): 0.81 / 0.72 linear, 0.64 / 0.50 cosine
    import re

    means = {(m[0], m[1]): float(m[2]) for m in
             re.findall(r"^(\w+) +P2 gamma=([\d.]+), k=1 +mean weight over uniform t = ([\d.]+)$", r.stdout, re.M)}
    assert means[("linear", "0.5")] == pytest.approx(0.81, abs=0.006)
    assert means[("linear", "1")] == pytest.approx(0.72, abs=0.006)
    assert means[("cosine", "0.5")] == pytest.approx(0.64, abs=0.006)
    assert means[("cosine", "1")] == pytest.approx(0.50, abs=0.006)
