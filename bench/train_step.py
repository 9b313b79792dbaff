"""Training-step and sampling-forward throughput of the p2core UNet; prints one JSON line.

Configs: the orientation config of issue 3 (32 px, 64 channels, 8.0M parameters, batch 32) and the paper's
lightweight ADM at 256 px (batch 1 on CPU, 8 on GPU). Usage: python bench/train_step.py [--device cuda] [--bf16]
[--compile] [--channels-last] [--repeats N]
"""
import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from p2core.diffusion import create_diffusion  # noqa: E402
from p2core.unet import create_model  # noqa: E402

CONFIGS = {
    "orient32": dict(image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2", learn_sigma=True,
                     attention_resolutions="16,8", num_head_channels=32, resblock_updown=True),
    "paper256": dict(image_size=256, num_channels=128, num_res_blocks=1, learn_sigma=True,
                     attention_resolutions="16", num_head_channels=64, resblock_updown=True),
}


def bench(name, kw, batch, device, bf16, compile_, channels_last, repeats):
    model = create_model(**kw).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_ else model
    diff = create_diffusion(learn_sigma=True, p2_gamma=1.0, rescale_learned_sigmas=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, kw["image_size"], kw["image_size"], device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device == "cuda") else torch.autocast("cpu", enabled=False)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        with ac:
            loss = diff.training_losses(lambda a, b: net(a, b).float(), x, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    train_s = (time.perf_counter() - t0) / repeats
    model.eval()
    with torch.inference_mode(), ac:
        t = torch.randint(0, 1000, (batch,), device=device)
        net(x, t)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            net(x, t)
        sync()
    fwd_s = (time.perf_counter() - t0) / repeats
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {f"{name}_params": sum(p.numel() for p in model.parameters()), f"{name}_batch": batch,
            f"{name}_train_step_s": round(train_s, 4), f"{name}_train_img_s": round(batch / train_s, 2),
            f"{name}_forward_s": round(fwd_s, 4), f"{name}_forward_img_s": round(batch / fwd_s, 2),
            f"{name}_peak_mem_mib": round(peak, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    out = {"device": a.device, "threads": torch.get_num_threads(), "bf16": a.bf16, "compile": a.compile,
           "channels_last": a.channels_last, "torch": torch.__version__}
    for name, kw in CONFIGS.items():
        if a.only and name != a.only:
            continue
        batch = 32 if name == "orient32" else (1 if a.device == "cpu" else 8)
        out.update(bench(name, kw, batch, a.device, a.bf16, a.compile, a.channels_last, a.repeats))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
