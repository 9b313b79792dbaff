"""Evaluation throughput before and after the changes of issue 12, measured side by side in one process.

- generation: image-steps/s of one DDIM step, fp32 vs bf16 autocast (the default where the device has bf16 units),
  for the CPU preset (1.19M, 32 px) and the paper config (93.6M, 256 px);
- clean resize to 299x299: clean-fid's PIL loop (image by image, channel by channel) vs the batched matmul with
  PIL's own filter (p2core.evaluation.clean_resize_batch);
- Inception features: before (PIL loop + NCHW) vs after (batched resize + NHWC), NVIDIA's network;
- FID-10k time projected from these, before and after.
Rounds alternate between before and after; medians. Prints one JSON line.

  python bench/eval_throughput.py [--n 64] [--device cpu|cuda] [--threads N]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from timing import alternate  # noqa: E402  (bench/timing.py)

from p2core import accel  # noqa: E402
from p2core.config import load_config  # noqa: E402
from p2core.evaluation import clean_resize_batch, get_extractor  # noqa: E402
from p2core.sampling import diffusion_for_spec  # noqa: E402
from p2core.unet import model_from_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generation(cfg, batch, device, rounds):
    model = model_from_config(cfg).to(device).eval()
    s = cfg.model.image_size
    x = torch.randn(batch, cfg.model.in_channels, s, s, device=device)
    d = diffusion_for_spec(cfg.diffusion, "ddim5")
    t = torch.full((batch,), 2, dtype=torch.long, device=device)

    def step(bf16):
        def fn():
            with torch.inference_mode(), accel.autocast(device, bf16):
                d.ddim_sample(lambda a, b: model(a, b).float(), x, t)
        return fn

    med = alternate({"fp32": step(False), "bf16": step(True)}, device, rounds)
    return {k: batch / v for k, v in med.items()}  # image-steps per second


def pil_loop_resize(imgs):
    from cleanfid.resize import build_resizer

    fn = build_resizer("clean")
    return torch.from_numpy(np.stack([fn(np.ascontiguousarray(im.transpose(1, 2, 0))).transpose(2, 0, 1)
                                      for im in imgs]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images per feature measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    device = torch.device(a.device)
    out = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "bf16_default": accel.use_bf16(accel.AUTO, device)}
    presets = {"cpu_preset": load_config(os.path.join(ROOT, "configs/fmnist_cpu.yaml")),
               "paper256": load_config(os.path.join(ROOT, "configs/ffhq256_p2.yaml"))}
    for name, cfg in presets.items():
        batch = 64 if name == "cpu_preset" else (1 if device.type == "cpu" else 64)
        g = generation(cfg, batch, device, a.rounds)
        for k, v in g.items():
            out[f"{name}_gen_img_steps_s_{k}"] = round(v, 2)
    imgs = np.random.default_rng(0).integers(0, 256, (a.n, 3, 32, 32), dtype=np.uint8)
    med = alternate({"before": lambda: pil_loop_resize(imgs), "after": lambda: clean_resize_batch(imgs, device)},
                    device, a.rounds)
    out["resize_img_s_before"] = round(a.n / med["before"], 1)
    out["resize_img_s_after"] = round(a.n / med["after"], 1)
    ext = get_extractor("inception").to(device)

    def features(before):
        def fn():
            with torch.inference_mode():
                if before:
                    return ext(pil_loop_resize(imgs).to(device))
                return ext(clean_resize_batch(imgs, device).contiguous(memory_format=torch.channels_last))
        return fn

    f_before, f_after = features(True)(), features(False)()
    out["features_max_abs_diff"] = float((f_before - f_after).abs().max())
    med = alternate({"before": features(True), "after": features(False)}, device, a.rounds)
    out["features_img_s_before"] = round(a.n / med["before"], 2)
    out["features_img_s_after"] = round(a.n / med["after"], 2)
    for when, gen_key, feat_key in (("before", "fp32", "features_img_s_before"),
                                    ("after", "bf16" if out["bf16_default"] else "fp32", "features_img_s_after")):
        feat_s = 10_000 / out[feat_key]
        for name in presets:
            for steps in (50, 250):
                gen_s = 10_000 * steps / out[f"{name}_gen_img_steps_s_{gen_key}"]
                out[f"{name}_fid10k_{steps}_projected_min_{when}"] = round((gen_s + feat_s) / 60, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
