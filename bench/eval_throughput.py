"""Evaluation throughput: generation images/s per sampling spec and feature-extraction images/s (NVIDIA's
Inception through clean-fid's clean resize), and the projected time of FID-10k at 50 and 250 steps for the CPU
preset and the paper config. Prints one JSON line. Usage: python bench/eval_throughput.py [--n 64]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from p2core.config import load_config  # noqa: E402
from p2core.evaluation import extract_features, get_extractor  # noqa: E402
from p2core.sampling import diffusion_for_spec  # noqa: E402
from p2core.unet import model_from_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_step_forward_s(cfg, batch, device, repeats=2):
    """Seconds for one denoising step of `batch` images (a sampler costs steps x this)."""
    model = model_from_config(cfg).to(device).eval()
    s = cfg.model.image_size
    x = torch.randn(batch, cfg.model.in_channels, s, s, device=device)
    d = diffusion_for_spec(cfg.diffusion, "ddim5")
    with torch.inference_mode():
        t = torch.full((batch,), 2, dtype=torch.long, device=device)
        d.ddim_sample(model, x, t)
        t0 = time.perf_counter()
        for _ in range(repeats):
            d.ddim_sample(model, x, t)
        if device == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64, help="images per measurement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"device": a.device, "threads": torch.get_num_threads()}
    presets = {"cpu_preset": load_config(os.path.join(ROOT, "configs/fmnist_cpu.yaml")),
               "paper256": load_config(os.path.join(ROOT, "configs/ffhq256_p2.yaml"))}
    for name, cfg in presets.items():
        batch = a.n if name == "cpu_preset" else (1 if a.device == "cpu" else 64)
        step_s = per_step_forward_s(cfg, batch, a.device)
        per_img_step = step_s / batch
        out[f"{name}_gen_img_s_per_step"] = round(1 / per_img_step, 2)
        for steps in (10, 25, 50, 250):
            out[f"{name}_gen_img_s_{steps}steps"] = round(1 / (per_img_step * steps), 3)
    ext = get_extractor("inception")
    imgs = np.random.default_rng(0).integers(0, 256, (a.n, 3, 32, 32), dtype=np.uint8)
    extract_features(imgs[:8], ext, device=a.device)
    t0 = time.perf_counter()
    extract_features(imgs, ext, batch_size=32, device=a.device)
    feat_s = (time.perf_counter() - t0) / a.n
    out["inception_img_s"] = round(1 / feat_s, 2)
    for name in presets:
        for steps in (50, 250):
            gen = 10_000 / out[f"{name}_gen_img_s_{steps}steps"]
            out[f"{name}_fid10k_{steps}_projected_min"] = round((gen + 10_000 * feat_s) / 60, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
