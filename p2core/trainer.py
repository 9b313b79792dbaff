"""The P2 training loop: driven by images seen, checkpointed atomically, resumable to the same loss sequence.

`Trainer` takes its parts as arguments (model, diffusion, data stream, EMA, optimizer, evaluator, event schedule,
hooks), as guided-diffusion's `TrainLoop` does; `Trainer.from_config` builds them from a TrainingConfig. It knows
nothing of Ray or MLflow: the sweep layer passes `hooks` (see `TrainerHooks`) and extra evaluation points.
Output directory layout: checkpoints/ckpt_<images>.pt, metrics.jsonl, samples/grid_<images>.png, loss.png,
config.yaml, and with a power-function EMA (train.ema.type power) ema_snapshots/snap_<images>.pt (p2core.phema).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from . import accel
from . import checkpoint as ckpt
from . import phema, plan
from .atomic import atomic_write_text, save_figure
from .config import TrainingConfig
from .data import load_dataset, to_float
from .diffusion import GaussianDiffusion, diffusion_from_config
from .ema import EMA, PowerEMAModel, make_ema
from .errors import Diverged, UserError
from .sampling import generate, save_grid
from .unet import model_from_config
from .weighting import SNR_PHASES, snr_phase

if TYPE_CHECKING:  # evaluation imports the feature networks: loaded only when a run evaluates
    from .evaluation import Evaluator


class TrainerHooks(Protocol):
    """What the trainer calls on its caller (the sweep layer's trainable, a test). Every method is optional: the
    trainer calls those the object has, so a hooks object may define any subset."""

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """After a training record ({"kind": "train", "images_seen", "step", "loss", ...}) is logged."""

    def on_eval(self, trainer: Trainer, record: dict) -> None:
        """After an evaluation ({"kind": "eval", "images_seen", "points", metrics..., "final"})."""

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        """After the checkpoint at `path` is written (or found already written)."""

    def on_snapshot(self, trainer: Trainer, path: str) -> None:
        """After the power-EMA snapshot file at `path` is written (before any checkpoint that lists it)."""


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


class ImageStream:
    """The training images as a stream of batches: each epoch a permutation seeded by (seed, epoch), batches cut
    across epoch boundaries, optional horizontal flips drawn from the caller's generator. Its state is
    (epoch, position in the epoch), so a resumed run continues the same order."""

    def __init__(self, images: np.ndarray, dataset_key: str, *, seed: int, random_flip: bool,
                 device: torch.device, channels_last: bool = False):
        """images: uint8 [N, C, S, S]; dataset_key: the dataset's identity (for reference statistics)."""
        self.images, self.dataset_key = images, dataset_key
        self.seed, self.random_flip, self.device, self.channels_last = seed, random_flip, device, channels_last
        self.epoch, self.pos = 0, 0
        self._perm = None

    def __len__(self) -> int:
        return len(self.images)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = None

    def _next_indices(self, n: int) -> torch.Tensor:
        out = []
        N = len(self.images)
        while n > 0:
            if self._perm is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(N, generator=g)
            take = min(n, N - self.pos)
            out.append(self._perm[self.pos:self.pos + take])
            self.pos += take
            n -= take
            if self.pos >= N:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return torch.cat(out)

    def next_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The next n images, float [n, C, S, S] in [-1, 1] on the device (channels-last if so configured); the
        flips draw n uniforms from `generator` (the trainer's, so its state in a checkpoint covers them)."""
        idx = self._next_indices(n).numpy()
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx]))
        x = to_float(x.to(self.device, non_blocking=True))
        if self.random_flip:
            flip = torch.rand(n, device=self.device, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class Trainer:
    def __init__(self, model: torch.nn.Module, diffusion: GaussianDiffusion, data: ImageStream,
                 ema: EMA | PowerEMAModel,
                 optimizer: torch.optim.Optimizer, evaluator: Evaluator | Callable[[], Evaluator] | None,
                 schedule: plan.Schedule, hooks: TrainerHooks | None = None, *, cfg: TrainingConfig, out_dir: str,
                 device: torch.device, bf16: bool = False, point_metrics: dict | None = None, progress: bool = True,
                 own_checkpoints: bool = True, snapshot_dir: str | None = None):
        """The parts, built (`from_config` builds them from a config; this constructor touches no file).

        model: the UNet on `device`, trained in place; ema: its EMA (classic, or a power EMA whose snapshots are
        written at the schedule's SNAPSHOT events; its evaluated profile is what grids and evaluations use); data:
        the training images; evaluator: an Evaluator, or a zero-argument callable that builds one at the first
        evaluation (building one may load Inception and draws on torch's global RNG, so `from_config` defers it
        past the training steps before it); schedule: when to log, sample, snapshot, evaluate and checkpoint, and
        where training ends; cfg: the hyperparameters the loop reads (seed, batch size, grad clip, eval and
        sampling settings) and what a checkpoint records; bf16: autocast the forward pass. point_metrics:
        evaluation point (images) -> the metric names computed there instead of the tracked metric (the cheap
        metric of a low ASHA rung); every other point computes the tracked metric. own_checkpoints: False when the
        caller keeps the checkpoints (the sweep layer hands them to Ray Tune at each report); snapshot_dir: where
        power-EMA snapshots are written (default out_dir/ema_snapshots)."""
        self.cfg, self.out_dir, self.hooks, self.progress = cfg, out_dir, hooks, progress
        self.own_checkpoints = own_checkpoints
        self.device, self.bf16 = device, bf16
        self.model, self.diffusion, self.data, self.ema, self.opt = model, diffusion, data, ema, optimizer
        self.schedule = schedule
        if schedule.snapshot_every > 0 and not hasattr(ema, "snapshot"):
            raise ValueError("the schedule has power-EMA snapshots but the EMA takes none (a classic EMA)")
        if evaluator is None or hasattr(evaluator, "evaluate_model"):
            self.evaluator, self._make_evaluator = evaluator, None
        else:
            self.evaluator, self._make_evaluator = None, evaluator
        # each timestep's SNR phase (index into SNR_PHASES), on the device: the per-phase loss sums index it
        self.phase_of_t = torch.from_numpy(snr_phase(diffusion.snr)).to(device)
        self.gen = torch.Generator(device=device).manual_seed(cfg.train.seed)  # timesteps, noise and flips
        self.images_seen = 0
        self.step = 0
        self.net = torch.compile(model) if cfg.train.compile else model
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.snapshot_dir = snapshot_dir or os.path.join(out_dir, "ema_snapshots")
        self.point_metrics = {int(k): list(v) for k, v in (point_metrics or {}).items()}
        self.missing_snapshots: list[int] = []  # power EMA: snapshot times a resume did not find (load_checkpoint)
        self._snapshot_at = -1  # the image count of the last snapshot this run wrote

    @classmethod
    def from_config(cls, cfg: TrainingConfig, out_dir: str, *, hooks: TrainerHooks | None = None,
                    extra_eval_points=(), point_metrics: dict | None = None, progress: bool = True,
                    resume: bool = False, resume_from: str | None = None, init_from: str | None = None,
                    own_checkpoints: bool = True, snapshot_dir: str | None = None) -> Trainer:
        """Build every part from `cfg`, start from `init_from`'s weights or resume (`resume_from`, or with
        `resume` the latest checkpoint in out_dir), and write out_dir/config.yaml. extra_eval_points: image
        counts evaluated besides eval_every_images and the end (ASHA rungs)."""
        t = cfg.train
        torch.set_num_threads(t.num_threads or available_cpus())
        device = resolve_device(t.device)
        # the global seed before anything draws from it (the model's initialisation): one seed, one run
        torch.manual_seed(t.seed)
        images, dataset_key = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels)
        data = ImageStream(images, dataset_key, seed=t.seed, random_flip=cfg.data.random_flip, device=device,
                           channels_last=t.channels_last)
        bf16 = accel.use_bf16(t.bf16, device)
        model = model_from_config(cfg).to(device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = make_ema(t, model)
        opt = accel.make_optimizer(model.parameters(), t.lr, t.weight_decay, device)
        diffusion = diffusion_from_config(cfg.diffusion)

        def evaluator() -> Evaluator:
            from .evaluation import Evaluator

            return Evaluator(cfg, images, dataset_key, device=device, progress=progress)

        trainer = cls(model, diffusion, data, ema, opt, evaluator, plan.Schedule.from_config(cfg, extra_eval_points),
                      hooks, cfg=cfg, out_dir=out_dir, device=device, bf16=bf16, point_metrics=point_metrics,
                      progress=progress, own_checkpoints=own_checkpoints, snapshot_dir=snapshot_dir)
        if init_from:
            trainer.init_weights(init_from)
        path = resume_from or (ckpt.latest_checkpoint(trainer.ckpt_dir) if resume else None)
        if path:
            trainer.load_checkpoint(path)
        elif resume:
            raise UserError(f"--resume: no checkpoint in {trainer.ckpt_dir}")
        elif isinstance(trainer.ema, PowerEMAModel):  # a fresh run starts its own snapshot series
            phema.remove_snapshots_after(trainer.snapshot_dir, 0)
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.yaml"), cfg.to_yaml())
        return trainer

    @property
    def images(self) -> np.ndarray:
        """The training images, uint8 [N, C, S, S]."""
        return self.data.images

    @property
    def dataset_key(self) -> str:
        return self.data.dataset_key

    @property
    def channels_last(self) -> bool:
        return self.data.channels_last

    # -- state ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a resume needs, as a checkpoint dict (torch.load(weights_only=True)-safe): weights, EMA,
        optimizer, counters, the RNG states (global, the trainer's generator, CUDA) and the data position. With a
        power EMA `ema` holds its evaluated profile's weights and `power_ema` the tracker's state."""
        rng = {"torch": torch.get_rng_state(), "gen": self.gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        out = {"format": ckpt.FORMAT, "config_yaml": self.cfg.to_yaml(), "model": self.model.state_dict(),
               "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(), "images_seen": self.images_seen,
               "step": self.step, "rng": rng, "data_state": self.data.state_dict(),
               "dataset_key": self.dataset_key}
        if isinstance(self.ema, PowerEMAModel):
            out["power_ema"] = self.ema.tracker_state()
            # the snapshots a resume needs beside it (a run continued elsewhere fetches them; `load_checkpoint`
            # names any that are missing)
            have = {n for n, _ in phema.list_snapshots(self.snapshot_dir) if n <= self.images_seen}
            out["snapshot_times"] = sorted(have | set(self.missing_snapshots))  # a gap stays named
        return out

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
        power = isinstance(self.ema, PowerEMAModel)
        if power != ("power_ema" in obj):
            saved, ours = ("power", "classic") if "power_ema" in obj else ("classic", "power")
            raise UserError(f"{path}: the checkpoint has a {saved} EMA, train.ema.type is {ours}")
        self.model.load_state_dict(obj["model"])
        if power:
            try:
                self.ema.load_tracker_state(obj["power_ema"])
            except ValueError as e:
                raise UserError(f"{path}: train.ema: {e}") from None
        else:
            self.ema.load_state_dict(obj["ema"])
        self.opt.load_state_dict(obj["optimizer"])
        for g in self.opt.param_groups:  # a checkpoint of an older version restores fused=None: keep ours
            g["fused"], g["foreach"] = self.opt.defaults["fused"], self.opt.defaults["foreach"]
        self.images_seen, self.step = int(obj["images_seen"]), int(obj["step"])
        self.data.load_state_dict(obj["data_state"])
        torch.set_rng_state(obj["rng"]["torch"].cpu())
        self.gen.set_state(obj["rng"]["gen"].cpu())
        if "cuda" in obj["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(obj["rng"]["cuda"].cpu(), self.device)
        # Drop log lines written after this checkpoint, so a resumed log reads like an uninterrupted one.
        kept = [r for r in read_jsonl(self.metrics_path) if r.get("images_seen", 0) <= self.images_seen]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        if power:  # and snapshots taken after it: the resumed run writes them again
            phema.remove_snapshots_after(self.snapshot_dir, self.images_seen)
            have = {n for n, _ in phema.list_snapshots(self.snapshot_dir)}
            self.missing_snapshots = sorted(set(obj.get("snapshot_times", ())) - have)
            if self.missing_snapshots:
                import sys

                gone = self.missing_snapshots
                shown = ", ".join(map(str, gone[:5])) + (" ..." if len(gone) > 5 else "")
                print(f"p2core: {path}: resumed without {len(gone)} of its EMA snapshots (at {shown} images; not "
                      f"in {self.snapshot_dir}): EMAs reconstructed from here on use the others", file=sys.stderr)

    def save_snapshot(self) -> str:
        """Write the power EMA's snapshot at this image count to ema_snapshots/snap_<images>.pt (atomically; a
        resumed run writes the same bytes again)."""
        path = phema.save_snapshot(self.ema.snapshot(), self.snapshot_dir)
        self._snapshot_at = self.images_seen
        self._call("on_snapshot", path)
        return path

    def init_weights(self, path: str) -> None:
        """Start from the weights (and EMA where present) of a p2sweep or official checkpoint: the model gets the
        trained weights, the EMA model the EMA weights (the trained ones where there are none)."""
        obj = ckpt.load_file(path)
        ckpt.load_checkpoint_weights(self.model, obj, path, prefer_ema=False)
        ckpt.load_checkpoint_weights(self.ema.model, obj, path, prefer_ema=True)

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
        """One optimizer and EMA step on the batch x (float [B, C, S, S]); returns the loss (a 0-d tensor, not
        synced to the host), the per-sample loss terms ([B] each) and the timesteps t ([B])."""
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
        self.ema.update(self.model, self.step, images_seen=self.images_seen + x.shape[0])
        return {"loss": loss.detach(), "terms": {k: v.detach() for k, v in terms.items()}, "t": t}

    def run(self) -> dict:
        """Train to the schedule's total_images; returns the last evaluation record (or {})."""
        from tqdm.auto import tqdm

        total, batch = self.schedule.total_images, self.cfg.train.batch_size
        bar = tqdm(total=total, initial=self.images_seen, unit="img", desc="training",
                   disable=not self.progress, dynamic_ncols=True, smoothing=0.1)
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
            while self.images_seen < total:
                before = self.images_seen
                n = min(batch, total - before)
                out = self.train_step(self.data.next_batch(n, self.gen))
                # the previous step's loss is read only now, after this step's work is queued: no host sync
                # inside a step on CUDA; every log, grid, evaluation and checkpoint below sees checked losses
                check_finite(unchecked)
                self.images_seen += n
                self.step += 1
                imgs_since += n
                unchecked = (out["loss"], self.images_seen)
                self._accumulate(acc, out)
                bar.update(n)
                due = self.schedule.due(before, self.images_seen)
                if due:  # an event reads this step's results: check its loss first
                    check_finite(unchecked)
                    unchecked = None
                if plan.LOG in due:
                    now = time.perf_counter()
                    rec = self._flush_acc(acc, imgs_since / max(now - t_last, 1e-9))
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
                    self._log(rec)
                    self._call("on_log", rec)
                    acc, t_last, imgs_since = self._new_acc(), now, 0
                if plan.SNAPSHOT in due:
                    self.save_snapshot()
                if plan.SAMPLE in due:
                    self.sample_grid()
                if plan.EVALUATE in due:
                    # every point this step passed is answered by one evaluation (e.g. an ASHA rung 2 images
                    # before the end and the end itself, inside one batch): the full end evaluation runs once
                    final = self.images_seen >= total
                    if final:
                        self.plot_losses()  # before the last evaluation: a scheduler may end the run at its report
                    last_eval = self.evaluate(final=final, points=self.schedule.evals_in(before, self.images_seen))
                if plan.CHECKPOINT in due and self.own_checkpoints:
                    self.save_checkpoint()
        finally:
            bar.close()
        self.plot_losses()
        return last_eval

    def _new_acc(self):
        # sums stay on the device between log points: one host sync per step (the divergence check), not four
        z = torch.zeros(len(SNR_PHASES), device=self.device, dtype=torch.float64)
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
        for (name, _, _), s, c in zip(SNR_PHASES, psum, pcnt):
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
        from .metrics import check_metric_produced, metrics_at

        if self.evaluator is None:
            if self._make_evaluator is None:
                raise ValueError("eval.enabled: this trainer was given no evaluator")
            self.evaluator = self._make_evaluator()
        own, tracked = metrics_at(points, self.point_metrics, final)
        specs = list(ev.sampling_steps) if tracked else []
        if tracked and self.cfg.metric and not (final and ev.full_at_end):
            specs = [check_metric_produced(self.cfg.metric, self.cfg)]
        t0 = time.perf_counter()
        results = self.evaluator.evaluate_model(self.ema.model, specs, seed=ev.seed, extra_metrics=own)
        if ev.ema_sigma_rels:
            t1 = time.perf_counter()
            if self._snapshot_at != self.images_seen:
                self.save_snapshot()  # so that what is scored here can be rebuilt from the files (best --export)
            if ev.ema_choose_on:
                self._evaluate_chosen_ema(results, specs, own)
            else:
                self._evaluate_each_ema(results, specs, own)
            results["ema_eval_seconds"] = time.perf_counter() - t1
        rec = {"kind": "eval", "images_seen": self.images_seen, **results,
               "eval_seconds": time.perf_counter() - t0, "final": final, "points": list(points)}
        self._log(rec)
        self._call("on_eval", rec)
        return rec

    def _evaluate_each_ema(self, results: dict, specs, own) -> None:
        """The same metrics, noise and seed for each reconstructed EMA (paired), added to `results`."""
        from .metrics import with_ema

        ev = self.cfg.eval
        for s, model in self.ema.reconstructed(ev.ema_sigma_rels, self.snapshot_dir):
            more = self.evaluator.evaluate_model(model, specs, seed=ev.seed, extra_metrics=own)
            results.update({with_ema(k, s): v for k, v in more.items() if k != "ref_samples"})

    def _evaluate_chosen_ema(self, results: dict, specs, own) -> None:
        """The cheap path (`eval.ema_choose_on`): every EMA (the tracked one first, then each reconstructed one) on
        the cheap metric alone, then the point's metrics (`specs`, `own`) for the EMA it ranks lowest, named
        `<name>_emachosen`; its sigma_rel in `ema_chosen` (and `ema_chosen_tracked` 1 when it is the tracked
        EMA). A tie keeps the earlier EMA (the tracked one first). Every EMA's cheap score comes from the same
        number of images and noise. Generation counts and times of the extra evaluations carry the EMA's suffix,
        as in `_evaluate_each_ema` (the tracked EMA's cheap one: the prefix `choose_`)."""
        from .metrics import CHOSEN, parse_metric_name, steps_label, with_ema
        from .respace import parse_respacing

        ev, cheap = self.cfg.eval, self.cfg.eval.ema_choose_on
        asked = set(own) | set(self.evaluator.configured_metrics(specs))
        _, n, spec = parse_metric_name(cheap)
        lab = steps_label(parse_respacing(spec))
        if not (cheap in results and results.get(f"gen_images_{lab}") == n):
            # paired: the tracked EMA's cheap score from as many images as the others' (a generation's noise
            # depends on its size), its generation counted apart from the point's own
            more = self.evaluator.evaluate_model(self.ema.model, [], seed=ev.seed, extra_metrics=[cheap])
            results.update({f"choose_{k}": v for k, v in more.items() if k.startswith(("gen_", "feat_"))})
            if cheap in asked:  # the point's own value (from more images) stays; the one compared is kept too
                results[f"choose_{cheap}"] = more[cheap]
            else:
                results[cheap] = more[cheap]
            tracked_v = more[cheap]
        else:
            tracked_v = results[cheap]
        best_s, best_v, best_sd = None, tracked_v, None
        for s, model in self.ema.reconstructed(ev.ema_sigma_rels, self.snapshot_dir):
            more = self.evaluator.evaluate_model(model, [], seed=ev.seed, extra_metrics=[cheap])
            results.update({with_ema(k, s): v for k, v in more.items() if k != "ref_samples"})
            v = more[cheap]
            if v < best_v or (math.isnan(best_v) and not math.isnan(v)):
                best_s, best_v = s, v
                best_sd = {k: t.detach().clone() for k, t in model.state_dict().items()}
        if best_sd is None:  # the tracked EMA won: its point metrics are computed already
            chosen = {k: results[k] for k in asked}
        elif asked <= {cheap}:  # the point asks for the cheap metric alone (a rung judged on it): known already
            chosen = {k: best_v for k in asked}
        else:
            model = self.ema._scratch
            model.load_state_dict(best_sd)
            chosen = self.evaluator.evaluate_model(model, specs, seed=ev.seed, extra_metrics=own)
            chosen.pop("ref_samples", None)
        results.update({with_ema(k, CHOSEN): v for k, v in chosen.items()})
        results["ema_chosen"] = float(self.ema.eval_sigma_rel if best_s is None else best_s)
        results["ema_chosen_tracked"] = float(best_s is None)

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
        for name, _, _ in SNR_PHASES:
            pts = [(r["images_seen"], r[f"loss_{name}"]) for r in recs if f"loss_{name}" in r]
            if pts:
                ax.plot(*zip(*pts), label=f"loss ({name})", alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("images seen")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
        return save_figure(fig, os.path.join(self.out_dir, "loss.png"))

