"""The P2 training loop: driven by images seen, checkpointed atomically, resumable to the same loss sequence.

The trainer knows nothing of Ray or MLflow: the sweep layer passes `hooks` (any object with some of
`on_log(trainer, record)`, `on_eval(trainer, record)`, `on_checkpoint(trainer, path)`) and extra evaluation points.
Output directory layout: checkpoints/ckpt_<images>.pt, metrics.jsonl, samples/grid_<images>.png, loss.png,
config.yaml.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from . import accel
from . import checkpoint as ckpt
from . import plan
from .atomic import atomic_write_text, save_figure
from .config import TrainingConfig
from .data import load_dataset, to_float
from .diffusion import diffusion_from_config
from .ema import EMA
from .errors import Diverged, UserError
from .sampling import generate, save_grid
from .unet import model_from_config

PHASES = (("coarse", 0.0, 1e-2), ("content", 1e-2, 1.0), ("cleanup", 1.0, math.inf))  # the paper's 3 stages by SNR


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: {name} requested but CUDA is not available")
    return torch.device(name)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash ends the log
    return out


class Trainer:
    def __init__(self, cfg: TrainingConfig, out_dir: str, *, hooks=None, extra_eval_points=(), point_metrics=None,
                 progress=True,
                 resume: bool = False, resume_from: str | None = None, init_from: str | None = None,
                 own_checkpoints: bool = True):
        self.cfg = cfg
        self.out_dir = out_dir
        self.hooks = hooks
        self.progress = progress
        # False when the caller keeps the checkpoints (the sweep layer hands them to Ray Tune at each report)
        self.own_checkpoints = own_checkpoints
        t = cfg.train
        torch.set_num_threads(t.num_threads or available_cpus())
        self.device = resolve_device(t.device)
        torch.manual_seed(t.seed)
        self.images, self.dataset_key = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels)
        self.bf16 = accel.use_bf16(t.bf16, self.device)
        self.channels_last = t.channels_last
        self.model = model_from_config(cfg).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, t.ema_rate, warmup=t.ema_warmup)
        self.opt = accel.make_optimizer(self.model.parameters(), t.lr, t.weight_decay, self.device)
        self.diffusion = diffusion_from_config(cfg.diffusion)
        self.phase_of_t = torch.from_numpy(np.digitize(self.diffusion.snr, [1e-2, 1.0])).to(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(t.seed)
        self.images_seen = 0
        self.step = 0
        self.epoch, self.pos = 0, 0
        self._perm = None
        self.net = torch.compile(self.model) if t.compile else self.model
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.evaluator = None
        self.eval_points = plan.eval_points(cfg, extra_eval_points)
        # evaluation point (images) -> the metric names computed there instead of the tracked metric (the cheap
        # metric of a low ASHA rung); every other point computes the tracked metric
        self.point_metrics = {int(k): list(v) for k, v in (point_metrics or {}).items()}
        if init_from:
            self.init_weights(init_from)
        path = resume_from or (ckpt.latest_checkpoint(self.ckpt_dir) if resume else None)
        if path:
            self.load_checkpoint(path)
        elif resume:
            raise UserError(f"--resume: no checkpoint in {self.ckpt_dir}")
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.yaml"), cfg.to_yaml())

    # -- state ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "gen": self.gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": ckpt.FORMAT, "config_yaml": self.cfg.to_yaml(), "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(), "images_seen": self.images_seen,
                "step": self.step, "rng": rng, "data_state": {"epoch": self.epoch, "pos": self.pos},
                "dataset_key": self.dataset_key}

    def save_checkpoint(self) -> str:
        path = ckpt.checkpoint_path(self.ckpt_dir, self.images_seen)
        if not os.path.exists(path):
            ckpt.atomic_torch_save(self.state(), path)
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        self._call("on_checkpoint", path)
        return path

    def load_checkpoint(self, path: str) -> None:
        obj = ckpt.load_file(path, map_location=self.device)
        if not ckpt.is_p2sweep_checkpoint(obj):
            raise UserError(f"{path}: not a p2sweep training checkpoint (use --init-from for bare weights)")
        self.model.load_state_dict(obj["model"])
        self.ema.load_state_dict(obj["ema"])
        self.opt.load_state_dict(obj["optimizer"])
        for g in self.opt.param_groups:  # a checkpoint of an older version restores fused=None: keep ours
            g["fused"], g["foreach"] = self.opt.defaults["fused"], self.opt.defaults["foreach"]
        self.images_seen, self.step = int(obj["images_seen"]), int(obj["step"])
        self.epoch, self.pos = int(obj["data_state"]["epoch"]), int(obj["data_state"]["pos"])
        self._perm = None
        torch.set_rng_state(obj["rng"]["torch"].cpu())
        self.gen.set_state(obj["rng"]["gen"].cpu())
        if "cuda" in obj["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(obj["rng"]["cuda"].cpu(), self.device)
        # Drop log lines written after this checkpoint, so a resumed log reads like an uninterrupted one.
        kept = [r for r in read_jsonl(self.metrics_path) if r.get("images_seen", 0) <= self.images_seen]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def init_weights(self, path: str) -> None:
        """Start from the weights (and EMA where present) of a p2sweep or official checkpoint: the model gets the
        trained weights, the EMA model the EMA weights (the trained ones where there are none)."""
        obj = ckpt.load_file(path)
        ckpt.load_checkpoint_weights(self.model, obj, path, prefer_ema=False)
        ckpt.load_checkpoint_weights(self.ema.model, obj, path, prefer_ema=True)

    # -- data ----------------------------------------------------------------------------------------------
    def _next_indices(self, n: int) -> torch.Tensor:
        out = []
        N = len(self.images)
        while n > 0:
            if self._perm is None:
                g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(N, generator=g)
            take = min(n, N - self.pos)
            out.append(self._perm[self.pos:self.pos + take])
            self.pos += take
            n -= take
            if self.pos >= N:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return torch.cat(out)

    def next_batch(self, n: int) -> torch.Tensor:
        idx = self._next_indices(n).numpy()
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx]))
        x = to_float(x.to(self.device, non_blocking=True))
        if self.cfg.data.random_flip:
            flip = torch.rand(n, device=self.device, generator=self.gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # -- the loop ------------------------------------------------------------------------------------------
    def _call(self, name, *args):
        fn = getattr(self.hooks, name, None) if self.hooks is not None else None
        if fn is not None:
            fn(self, *args)

    def _log(self, record: dict) -> None:
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        os.makedirs(self.out_dir, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train_step(self, x: torch.Tensor) -> dict:
        t = self.diffusion.sample_timesteps(x.shape[0], device=self.device, generator=self.gen)
        noise = torch.randn(x.shape, device=self.device, generator=self.gen)
        net = self.net

        def model(xt, tt):
            with accel.autocast(self.device, self.bf16):
                return net(xt, tt).float()

        terms = self.diffusion.training_losses(model, x, t, noise=noise)
        loss = terms["loss"].mean()
        tr = self.cfg.train
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if tr.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
        self.opt.step()
        self.ema.update(self.model, self.step)
        return {"loss": loss.detach(), "terms": {k: v.detach() for k, v in terms.items()}, "t": t}

    def run(self) -> dict:
        """Train to total_images; returns the last evaluation record (or {})."""
        from tqdm.auto import tqdm

        tr = self.cfg.train
        bar = tqdm(total=tr.total_images, initial=self.images_seen, unit="img", desc="training",
                   disable=not self.progress, dynamic_ncols=True, smoothing=0.1)
        next_log = (self.images_seen // tr.log_every_images + 1) * tr.log_every_images if tr.log_every_images else math.inf
        next_ckpt = ((self.images_seen // tr.checkpoint_every_images + 1) * tr.checkpoint_every_images
                     if tr.checkpoint_every_images else math.inf)
        next_sample = ((self.images_seen // tr.sample_every_images + 1) * tr.sample_every_images
                       if tr.sample_every_images else math.inf)
        pending_eval = [p for p in self.eval_points if p > self.images_seen]
        acc = self._new_acc()
        last_eval: dict = {}
        t_last = time.perf_counter()
        imgs_since = 0
        unchecked = None

        def check_finite(pending):
            if pending is not None:
                loss = pending[0].item()
                if not math.isfinite(loss):
                    raise Diverged(pending[1], loss)

        try:
            while self.images_seen < tr.total_images:
                n = min(tr.batch_size, tr.total_images - self.images_seen)
                out = self.train_step(self.next_batch(n))
                # the previous step's loss is read only now, after this step's work is queued: no host sync
                # inside a step on CUDA; every log, grid, evaluation and checkpoint below sees checked losses
                check_finite(unchecked)
                self.images_seen += n
                self.step += 1
                imgs_since += n
                unchecked = (out["loss"], self.images_seen)
                self._accumulate(acc, out)
                bar.update(n)
                if (self.images_seen >= min(next_log, next_sample, next_ckpt, tr.total_images)
                        or (pending_eval and self.images_seen >= pending_eval[0])):
                    check_finite(unchecked)
                    unchecked = None
                if self.images_seen >= next_log or self.images_seen >= tr.total_images:
                    now = time.perf_counter()
                    rec = self._flush_acc(acc, imgs_since / max(now - t_last, 1e-9))
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
                    self._log(rec)
                    self._call("on_log", rec)
                    acc, t_last, imgs_since = self._new_acc(), now, 0
                    next_log += tr.log_every_images if tr.log_every_images else 0
                if self.images_seen >= next_sample or self.images_seen >= tr.total_images:
                    self.sample_grid()
                    while next_sample <= self.images_seen:
                        next_sample += tr.sample_every_images or math.inf
                if pending_eval and self.images_seen >= pending_eval[0]:
                    # every point this step passed is answered by one evaluation (e.g. an ASHA rung 2 images
                    # before the end and the end itself, inside one batch): the full end evaluation runs once
                    answered = [p for p in pending_eval if p <= self.images_seen]
                    pending_eval = [p for p in pending_eval if p > self.images_seen]
                    final = self.images_seen >= tr.total_images
                    if final:
                        self.plot_losses()  # before the last evaluation: a scheduler may end the run at its report
                    last_eval = self.evaluate(final=final, points=answered)
                if self.own_checkpoints and (self.images_seen >= next_ckpt or self.images_seen >= tr.total_images):
                    self.save_checkpoint()
                    while next_ckpt <= self.images_seen:
                        next_ckpt += tr.checkpoint_every_images or math.inf
        finally:
            bar.close()
        self.plot_losses()
        return last_eval

    def _new_acc(self):
        # sums stay on the device between log points: one host sync per step (the divergence check), not four
        z = torch.zeros(len(PHASES), device=self.device, dtype=torch.float64)
        return {"sums": torch.zeros(3, device=self.device, dtype=torch.float64), "n": 0,
                "psum": z.clone(), "pcnt": z.clone()}

    def _accumulate(self, acc, out):
        terms, n = out["terms"], out["t"].shape[0]
        vb = terms["vb"].sum() if "vb" in terms else terms["loss"].new_zeros(())
        acc["sums"] += torch.stack([terms["loss"].sum(), terms["mse"].sum(), vb]).double()
        ph = self.phase_of_t[out["t"]]
        acc["psum"].index_add_(0, ph, terms["loss"].double())
        acc["pcnt"].index_add_(0, ph, torch.ones_like(terms["loss"], dtype=torch.float64))
        acc["n"] += n

    def _flush_acc(self, acc, img_s) -> dict:
        n = max(acc["n"], 1)
        loss, mse, vb = acc["sums"].cpu().tolist()
        rec = {"kind": "train", "images_seen": self.images_seen, "step": self.step, "loss": loss / n,
               "mse": mse / n, "images_per_s": img_s, "lr": self.opt.param_groups[0]["lr"]}
        if self.diffusion.learn_sigma:
            rec["vb"] = vb / n
        psum, pcnt = acc["psum"].cpu().tolist(), acc["pcnt"].cpu().tolist()
        for (name, _, _), s, c in zip(PHASES, psum, pcnt):
            if c > 0:
                rec[f"loss_{name}"] = s / c
        return rec

    # -- evaluation and samples ---------------------------------------------------------------------------
    def evaluate(self, final: bool = False, points=()) -> dict:
        """Evaluate the EMA weights at the evaluation points `points` (answered by this one evaluation): each
        point's own metrics (`point_metrics`) or the tracked metric's spec; every spec at the end
        (eval.full_at_end). The record names the points it answers."""
        ev = self.cfg.eval
        if not ev.enabled:
            rec = {"kind": "eval", "images_seen": self.images_seen, "points": list(points)}
            self._call("on_eval", rec)
            return rec
        from .evaluation import Evaluator
        from .metrics import check_metric_produced

        if self.evaluator is None:
            self.evaluator = Evaluator(self.cfg, self.images, self.dataset_key, device=self.device,
                                       progress=self.progress)
        own = [m for p in points for m in self.point_metrics.get(p, [])]
        tracked = final or not points or any(p not in self.point_metrics for p in points)
        specs = list(ev.sampling_steps) if tracked else []
        if tracked and self.cfg.metric and not (final and ev.full_at_end):
            specs = [check_metric_produced(self.cfg.metric, self.cfg)]
        t0 = time.perf_counter()
        results = self.evaluator.evaluate_model(self.ema.model, specs, seed=ev.seed, extra_metrics=own)
        rec = {"kind": "eval", "images_seen": self.images_seen, **results,
               "eval_seconds": time.perf_counter() - t0, "final": final, "points": list(points)}
        self._log(rec)
        self._call("on_eval", rec)
        return rec

    def sample_grid(self) -> str | None:
        n = self.cfg.train.grid_samples
        if not n:
            return None
        spec = self.cfg.eval.sampling_steps[0]
        imgs = generate(self.ema.model, self.cfg.diffusion, spec, n, image_size=self.cfg.model.image_size,
                        channels=self.cfg.model.in_channels, batch_size=min(n, self.cfg.eval.batch_size),
                        seed=self.cfg.eval.seed, device=self.device, bf16=self.bf16)
        return save_grid(imgs, os.path.join(self.out_dir, "samples", f"grid_{self.images_seen:012d}.png"))

    def plot_losses(self) -> str | None:
        recs = [r for r in read_jsonl(self.metrics_path) if r.get("kind") == "train"]
        if not recs:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        x = [r["images_seen"] for r in recs]
        ax.plot(x, [r["loss"] for r in recs], label="loss", color="black")
        for name, _, _ in PHASES:
            pts = [(r["images_seen"], r[f"loss_{name}"]) for r in recs if f"loss_{name}" in r]
            if pts:
                ax.plot(*zip(*pts), label=f"loss ({name})", alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("images seen")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
        return save_figure(fig, os.path.join(self.out_dir, "loss.png"))

