"""Training step and sampling step of the p2core UNet, optionally side by side with the official P2/ADM UNet.

One JSON line. A training step is what a trainer does per batch: sample t and noise, the hybrid loss (P2 gamma 1,
learned sigma, rescaled vb), backward, AdamW, EMA update. A sampling step is one UNet forward in inference mode.

  python bench/train_step.py                                    # ours alone, both configs
  python bench/train_step.py --official ~/P2-weighting --only orient32 --threads 2

With --official PATH (a checkout of jychoi118/P2-weighting or openai/guided-diffusion: the folder that holds the
`guided_diffusion` package) the official UNet is built with the same flags, loaded with our initial weights
(strict: same state_dict layout), checked to give the same output in fp32, and timed beside ours in the same process:
its own GaussianDiffusion.training_losses, the torch AdamW that its train_util builds, its nn.update_ema. Rounds
alternate between the two models and the medians are reported, so drift of the machine hits both alike. The
official code is imported from PATH at run time only; nothing of it is in this project.

Ours runs with the project's defaults for the device unless flags say otherwise (--bf16 auto|on|off,
--channels-last on|off; p2core/accel.py): on a CPU with bf16 units that is bf16 autocast, which changes the numbers.
The fp32 comparison at equal numbers is `--bf16 off`; the JSON says which settings ran.
"""
import argparse
import importlib
import inspect
import json
import os
import platform
import resource
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from timing import timed  # noqa: E402  (bench/timing.py)

from p2core import accel  # noqa: E402
from p2core.arch import parse_attention_resolutions, parse_channel_mult  # noqa: E402
from p2core.diffusion import create_diffusion  # noqa: E402
from p2core.ema import EMA  # noqa: E402
from p2core.unet import create_model  # noqa: E402

CONFIGS = {
    # issue 3's orientation config: 32 px, 8.0M parameters, batch 32
    "orient32": dict(image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2", learn_sigma=True,
                     attention_resolutions="16,8", num_head_channels=32, resblock_updown=True),
    # configs/fmnist_cpu.yaml's UNet (1.19M)
    "cpu_preset": dict(image_size=32, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                       learn_sigma=True, attention_resolutions="8", num_head_channels=32, resblock_updown=False),
    # the paper's lightweight ADM at 256 px (93.6M)
    "paper256": dict(image_size=256, num_channels=128, num_res_blocks=1, learn_sigma=True,
                     attention_resolutions="16", num_head_channels=64, resblock_updown=True),
}
P2 = dict(p2_gamma=1.0, p2_k=1.0)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def switch(v: str):
    return {"auto": accel.AUTO, "on": True, "off": False}[v]


class Ours:
    name = "ours"

    def __init__(self, kw, batch, device, bf16, channels_last, compile_):
        self.device = device
        self.bf16 = accel.use_bf16(bf16, device)
        self.cl = channels_last
        self.model = create_model(**kw).to(device)
        if self.cl:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = torch.compile(self.model) if compile_ else self.model
        self.ema = EMA(self.model, 0.9999)
        self.opt = accel.make_optimizer(self.model.parameters(), 1e-4, 0.0, device)
        self.diff = create_diffusion(learn_sigma=True, rescale_learned_sigmas=True, **P2)
        self.step_no = 0

    def prep(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.cl else x

    def forward(self, x, t):
        with accel.autocast(self.device, self.bf16):
            return self.net(x, t).float()

    def train_step(self, x, t, noise):
        loss = self.diff.training_losses(self.forward, x, t, noise=noise)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update(self.model, self.step_no)
        self.step_no += 1
        return loss


class Official:
    """The official UNet and training step, imported from a checkout at `path` (never copied here)."""
    name = "official"

    def __init__(self, path, kw, device, init_state):
        sys.path.insert(0, os.path.abspath(os.path.expanduser(path)))
        try:
            unet = importlib.import_module("guided_diffusion.unet")
            gd = importlib.import_module("guided_diffusion.gaussian_diffusion")
            nn = importlib.import_module("guided_diffusion.nn")
        except ImportError as e:
            raise SystemExit(f"--official {path}: cannot import guided_diffusion from it ({e})")
        finally:
            sys.path.pop(0)
        size = kw["image_size"]
        self.model = unet.UNetModel(
            image_size=size, in_channels=kw.get("in_channels", 3), model_channels=kw["num_channels"],
            out_channels=2 * kw.get("in_channels", 3),
            num_res_blocks=kw["num_res_blocks"],
            attention_resolutions=parse_attention_resolutions(kw["attention_resolutions"], size),
            dropout=0.0, channel_mult=parse_channel_mult(kw.get("channel_mult", ""), size),
            num_head_channels=kw["num_head_channels"], use_scale_shift_norm=True,
            resblock_updown=kw["resblock_updown"]).to(device)
        self.model.load_state_dict(init_state, strict=True)
        self.ema_params = [p.detach().clone() for p in self.model.parameters()]
        self.update_ema = nn.update_ema
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)  # as its train_util
        betas = gd.get_named_beta_schedule("linear", 1000)
        dkw = dict(betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
                   model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.RESCALED_MSE)
        params = inspect.signature(gd.GaussianDiffusion.__init__).parameters
        self.p2 = all(k in params for k in P2)  # P2-weighting's GaussianDiffusion; guided-diffusion has no weight
        if self.p2:
            dkw.update(P2)
        self.diff = gd.GaussianDiffusion(**dkw)

    def prep(self, x):
        return x

    def forward(self, x, t):
        return self.model(x, t)

    def train_step(self, x, t, noise):
        loss = self.diff.training_losses(self.model, x, t, noise=noise)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.update_ema(self.ema_params, list(self.model.parameters()), rate=0.9999)
        return loss


def run_config(name, kw, batch, device, args):
    torch.manual_seed(0)
    ours = Ours(kw, batch, device, switch(args.bf16), switch(args.channels_last), args.compile)
    sides = [ours]
    out = {f"{name}_params": sum(p.numel() for p in ours.model.parameters()), f"{name}_batch": batch,
           f"{name}_bf16": ours.bf16, f"{name}_channels_last": ours.cl}
    if args.official:
        with torch.no_grad():  # zero-initialised output layers would make the equality check below vacuous
            for p in ours.model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(device), alpha=0.02)
        off = Official(args.official, kw, device, {k: v.clone() for k, v in ours.model.state_dict().items()})
        # same weights, same input -> same output (fp32): the two are the same network
        g = torch.Generator().manual_seed(1)
        xs = torch.randn(2, kw.get("in_channels", 3), kw["image_size"], kw["image_size"], generator=g).to(device)
        ts = torch.tensor([10, 900], device=device)
        with torch.no_grad():
            ref, mine = off.model(xs, ts), ours.model(xs, ts)
        out[f"{name}_official_max_abs_diff_fp32"] = float((ref - mine).abs().max())
        out[f"{name}_official_p2_weighting"] = off.p2
        sides.append(off)
    s = kw["image_size"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, kw.get("in_channels", 3), s, s, generator=gen).to(device)
    for side in sides:
        # warm-up: allocator, oneDNN primitive caches, compile
        for _ in range(2):
            t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            side.train_step(side.prep(x), t, torch.randn(x.shape, generator=gen).to(device))
    times = {side.name: {"train": [], "sample": []} for side in sides}
    for _ in range(args.repeats):
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        noise = torch.randn(x.shape, generator=gen).to(device)
        for side in sides:
            xi = side.prep(x)
            times[side.name]["train"].append(timed(lambda: side.train_step(xi, t, noise), device))
    for side in sides:
        side.model.eval()
    with torch.inference_mode():
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        for side in sides:
            side.forward(side.prep(x), t)
        for _ in range(args.repeats):
            for side in sides:
                xi = side.prep(x)
                times[side.name]["sample"].append(timed(lambda: side.forward(xi, t), device))
    for side in sides:
        for kind in ("train", "sample"):
            med = statistics.median(times[side.name][kind])
            key = f"{name}_{kind}_step_s" if side.name == "ours" else f"{name}_official_{kind}_step_s"
            out[key] = round(med, 4)
    if args.official:
        for kind in ("train", "sample"):
            out[f"{name}_{kind}_speedup_vs_official"] = round(
                out[f"{name}_official_{kind}_step_s"] / out[f"{name}_{kind}_step_s"], 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--official", default="", help="checkout of the official P2 / guided-diffusion code")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--channels-last", choices=["on", "off"], default="off")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=0, help="0 = 32 (8 for paper256 on GPU, 1 on CPU)")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(CONFIGS))
    a = ap.parse_args()
    if a.official and not os.path.isdir(os.path.join(os.path.expanduser(a.official), "guided_diffusion")):
        print(f"--official {a.official}: no guided_diffusion folder there", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    device = torch.device(a.device)
    out = {"device": str(device), "cpu": cpu_name(), "threads": torch.get_num_threads(), "compile": a.compile,
           "torch": torch.__version__, "official": bool(a.official)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    names = a.only.split(",") if a.only else list(CONFIGS)
    for name in names:
        if name not in CONFIGS:
            print(f"--only: unknown config {name!r} (expected {', '.join(CONFIGS)})", file=sys.stderr)
            sys.exit(2)
    for name in names:
        batch = a.batch or (32 if name != "paper256" else (8 if device.type == "cuda" else 1))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out.update(run_config(name, CONFIGS[name], batch, device, a))
        out[f"{name}_peak_mem_mib"] = round(
            torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
