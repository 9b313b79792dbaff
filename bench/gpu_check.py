"""The GPU checks of issues 12 and 13 as one script (about 8 minutes on one H100); prints a table and JSON lines.

Self-contained on a bare GPU machine: needs torch, torchvision, numpy, PyYAML, Pillow and tqdm, no file over 64 MiB
(no Inception weights: an Inception-v3 of the same architecture with random weights stands in, which costs the same
time) and no clean-fid. Every part has a time budget; a part that would overrun is skipped and says so.

  python bench/gpu_check.py [--official PATH] [--out DIR] [--budget-s 480] [--quick]

Parts:
  train    bench/train_step.py on cuda: paper config (256 px, 93.6M, batch 8) and the orientation config (8.0M,
           batch 32), fp32 / bf16 / bf16+channels_last / +torch.compile, side by side with the official UNet
           when --official is given (issue 13).
  share    images/s of a paper-config trial alone on the GPU vs two such trials at once on the same GPU (what
           `resources.gpu: 0.5` does), through p2core's Trainer on synthetic data (issue 13).
  eval     FID-10k cost at 50 steps on the 32 px preset: generating 10k images (DDIM-50), the batched clean
           resize and Inception features (fp32 and bf16), and 1,000 samples of the paper config extrapolated from
           a shorter run (issue 12).
--quick shrinks every count so the script can be checked on a CPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from timing import sync  # noqa: E402  (bench/timing.py)

RESULTS = []
T0 = time.perf_counter()


def emit(part, **kw):
    rec = {"part": part, **kw}
    RESULTS.append(rec)
    print(json.dumps(rec), flush=True)


def left(budget):
    return budget - (time.perf_counter() - T0)


# -- issue 13: training step ----------------------------------------------------------------------------------

def part_train(a, device):
    runs = [("fp32", ["--bf16", "off", "--channels-last", "off"], True),
            ("bf16", ["--bf16", "on", "--channels-last", "off"], True),
            ("bf16_cl", ["--bf16", "on", "--channels-last", "on"], True),
            ("fp32_compile", ["--bf16", "off", "--channels-last", "off", "--compile"], False),
            ("bf16_cl_compile", ["--bf16", "on", "--channels-last", "on", "--compile"], False)]
    only = "cpu_preset" if a.quick else "paper256,orient32"
    for label, flags, with_official in runs:
        need = 150 if "--compile" in flags else 40
        if left(a.budget_s) < need + a.reserve_s:
            emit("train", variant=label, skipped=f"budget ({left(a.budget_s):.0f} s left)")
            continue
        cmd = [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--device", str(device),
               "--only", only, "--repeats", "2" if a.quick else "10"] + flags
        if a.official and with_official:
            cmd += ["--official", a.official]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, left(a.budget_s) - a.reserve_s))
        if p.returncode:
            emit("train", variant=label, error=p.stderr.strip().splitlines()[-1:])
            continue
        emit("train", variant=label, wall_s=round(time.perf_counter() - t, 1), **json.loads(p.stdout.splitlines()[-1]))


# -- issue 13: two trials sharing one GPU ---------------------------------------------------------------------

TRIAL = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from p2core.config import load_config
from p2core.trainer import Trainer
cfg = load_config({cfg!r}, overrides={over!r})
tr = Trainer.from_config(cfg, {out!r}, progress=False)
t0 = time.perf_counter()
tr.run()
recs = [json.loads(l) for l in open(tr.metrics_path) if '"images_per_s"' in l]
print(json.dumps({{"wall_s": time.perf_counter() - t0, "img_s": [r["images_per_s"] for r in recs]}}))
"""


def part_share(a, device):
    if left(a.budget_s) < 90 + a.reserve_s:
        emit("share", skipped="budget")
        return
    quick = a.quick
    cfg = os.path.join(ROOT, "configs", "fmnist_cpu.yaml" if quick else "ffhq256_p2.yaml")
    n = 64 if quick else 1200
    over = {"data.dataset": "synthetic", "data.max_images": 256, "eval.enabled": False, "train.total_images": n,
            "train.batch_size": 8, "train.log_every_images": 8 * 10, "train.checkpoint_every_images": 0,
            "train.grid_samples": 0, "train.device": str(device), "train.num_threads": 4, "metric": ""}
    if quick:
        over["train.batch_size"] = 16
        over["train.log_every_images"] = 16

    def launch(k, tmp):
        code = TRIAL.format(root=ROOT, cfg=cfg, over=over, out=os.path.join(tmp, f"t{k}"))
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def steady(img_s):
        tail = img_s[len(img_s) // 3:] or img_s  # drop the warm-up logs
        return float(np.median(tail))

    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for label, k in (("gpu_1", 1), ("gpu_0.5", 2)):
            procs = [launch(f"{label}_{i}", tmp) for i in range(k)]
            res = []
            for p in procs:
                so, se = p.communicate(timeout=max(30, left(a.budget_s) - a.reserve_s))
                if p.returncode:
                    emit("share", error=se.strip().splitlines()[-3:])
                    return
                res.append(json.loads(so.strip().splitlines()[-1]))
            out[f"{label}_img_s_each"] = [round(steady(r["img_s"]), 1) for r in res]
            out[f"{label}_img_s_total"] = round(sum(steady(r["img_s"]) for r in res), 1)
        out["shared_total_over_alone"] = round(out["gpu_0.5_img_s_total"] / out["gpu_1_img_s_total"], 3)
        emit("share", config=os.path.basename(cfg), batch=over["train.batch_size"], images_per_trial=n, **out)


# -- issue 12: evaluation cost --------------------------------------------------------------------------------

def random_inception(device):
    """torchvision's Inception-v3 with random weights, cut at the 2048-d pool: NVIDIA's network's architecture."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    return net.eval().to(device)


def part_eval(a, device):
    from p2core import accel
    from p2core.config import load_config
    from p2core.evaluation import clean_resize_batch
    from p2core.sampling import generate
    from p2core.unet import model_from_config

    n = 64 if a.quick else 10_000
    # generation, 32 px presets, DDIM-50, bf16 per the project default
    for preset in ("fmnist_cpu.yaml",) if a.quick else ("fmnist_cpu.yaml", "fmnist_gpu_orient.yaml"):
        if left(a.budget_s) < 60 + a.reserve_s:
            emit("eval", what=f"generate {preset}", skipped="budget")
            continue
        if preset == "fmnist_gpu_orient.yaml":  # the 8.0M orientation UNet, 3 channels, on 32 px
            cfg = load_config(os.path.join(ROOT, "configs", "fmnist_cpu.yaml"), overrides={
                "model.num_channels": 64, "model.num_res_blocks": 2, "model.attention_resolutions": "16,8",
                "model.in_channels": 3, "model.resblock_updown": True, "data.dataset": "synthetic"})
        else:
            cfg = load_config(os.path.join(ROOT, "configs", preset))
        model = model_from_config(cfg).to(device)
        params = sum(p.numel() for p in model.parameters())
        bs = 16 if a.quick else 2000
        kw = dict(image_size=cfg.model.image_size, channels=cfg.model.in_channels, batch_size=bs, device=device)
        generate(model, cfg.diffusion, "ddim5", min(bs, n), **kw)  # warm-up
        sync(device)
        t = time.perf_counter()
        imgs = generate(model, cfg.diffusion, "ddim50", n, **kw)
        sync(device)
        gen_s = time.perf_counter() - t
        emit("eval", what="generate", preset=preset, params=params, images=n, spec="ddim50", batch=bs,
             bf16=accel.use_bf16(accel.AUTO, device), seconds=round(gen_s, 2), img_s=round(n / gen_s, 1))
    # clean resize (batched, on the device) + Inception-architecture features
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    net = random_inception(device)
    bs = 16 if a.quick else 500
    for variant in ("fp32", "fp32_cl", "bf16_cl"):
        if left(a.budget_s) < 45 + a.reserve_s:
            emit("eval", what=f"features {variant}", skipped="budget")
            continue
        cl = variant.endswith("_cl")
        m = net.to(memory_format=torch.channels_last) if cl else net
        ac = accel.autocast(device, variant.startswith("bf16"))

        def feats(chunk):
            x = clean_resize_batch(chunk, device)
            x = (x - 128.0) / 128.0
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with ac:
                return m(x).float()

        with torch.inference_mode():
            feats(imgs[:bs])
            sync(device)
            t = time.perf_counter()
            resize_s = 0.0
            for s in range(0, n, bs):
                t1 = time.perf_counter()
                clean_resize_batch(imgs[s:s + bs], device)
                sync(device)
                resize_s += time.perf_counter() - t1
            t = time.perf_counter()
            for s in range(0, n, bs):
                f = feats(imgs[s:s + bs]).cpu()
            sync(device)
            feat_s = time.perf_counter() - t
        emit("eval", what="features", variant=variant, images=n, batch=bs, feature_dim=int(f.shape[1]),
             seconds_with_resize=round(feat_s, 2), resize_only_s=round(resize_s, 2), img_s=round(n / feat_s, 1))
    # paper config: 1,000 samples, extrapolated from a short run
    if left(a.budget_s) < 40 + a.reserve_s:
        emit("eval", what="paper256 generate", skipped="budget")
        return
    cfg = load_config(os.path.join(ROOT, "configs", "ffhq256_p2.yaml"), overrides={"data.dataset": "synthetic"})
    model = model_from_config(cfg).to(device)
    bs, k = (2, 2) if a.quick else (100, 10)
    kw = dict(image_size=cfg.model.image_size, channels=cfg.model.in_channels, batch_size=bs, device=device)
    generate(model, cfg.diffusion, "ddim2", bs, **kw)
    sync(device)
    t = time.perf_counter()
    generate(model, cfg.diffusion, f"ddim{k}", bs, **kw)
    sync(device)
    per_img_step = (time.perf_counter() - t) / (bs * k)
    emit("eval", what="paper256 generate", images=bs, steps=k, batch=bs, img_steps_s=round(1 / per_img_step, 1),
         projected_1000_at_50_s=round(1000 * 50 * per_img_step, 1),
         projected_1000_at_250_s=round(1000 * 250 * per_img_step, 1),
         projected_10k_at_250_min=round(10_000 * 250 * per_img_step / 60, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--reserve-s", type=float, default=10)
    ap.add_argument("--parts", default="eval,share,train")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"device": str(device), "torch": torch.__version__, "cpus": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    emit("env", **env)
    for part in a.parts.split(","):
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the share part's trials are other processes: free this one's cache
        try:
            {"train": part_train, "share": part_share, "eval": part_eval}[part](a, device)
        except Exception as e:  # one failing part must not cost the figures of the others
            emit(part, error=f"{type(e).__name__}: {e}")
    emit("done", wall_s=round(time.perf_counter() - T0, 1))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_check.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in RESULTS)


if __name__ == "__main__":
    main()
