"""The EMA of the weights a training run keeps (`train.ema.type`, see p2core.config).

`EMA` (classic, the default): ema <- rate * ema + (1 - rate) * param (ADM's update). With warmup (off by default,
as in ADM) the rate is min(rate, (1 + step) / (10 + step)), so that short runs (CPU presets, the first ASHA rungs
of a sweep) are not dominated by the initial weights.

`PowerEMAModel` (power): a `p2core.phema.PowerEMA` tracking the `train.ema.sigma_rels` profiles behind the same
interface (`.model`, `update`, `state_dict`), plus `snapshot()` for the post-hoc reconstruction. Its `.model`, which
the trainer samples and evaluates and whose weights a checkpoint stores as `ema`, is the tracked profile with the
largest sigma_rel (0.10 by default); an EMA of any other width is reconstructed from the snapshots afterwards.
Memory: one shadow copy of the parameters per profile plus that model (three copies for two profiles, against one
for the classic EMA).

The trainer calls `update(model, step, images_seen=...)` after each optimizer step: the classic EMA reads the step
(its warm-up), the power EMA the images seen after it (its time axis).
"""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, rate: float = 0.9999, warmup: bool = False):
        self.rate = rate
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def rate_at(self, step: int) -> float:
        return min(self.rate, (1 + step) / (10 + step)) if self.warmup else self.rate

    def update(self, model: torch.nn.Module, step: int = 0, images_seen: int | None = None) -> None:
        """images_seen: unused (the power EMA's time axis; accepted so that the trainer calls both alike)."""
        ema_p = list(self.model.parameters())
        src = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src, 1.0 - self.rate_at(step))
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)


SNAPSHOT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class PowerEMAModel:
    """A power-function EMA (`p2core.phema.PowerEMA`) with the classic EMA's interface; see the module docstring.

    tracker: the PowerEMA (its `state_dict()` goes into checkpoints as `power_ema`); model: the evaluated profile's
    weights (synchronised from the tracker when read after an update); snapshot_dtype: the dtype of `snapshot()`.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels=(0.05, 0.10), snapshot_dtype: torch.dtype = torch.float16):
        from .phema import PowerEMA

        self.tracker = PowerEMA(model, sigma_rels)
        self.snapshot_dtype = snapshot_dtype
        self.eval_profile = self.tracker.keys[max(range(len(self.tracker.sigma_rels)),
                                                  key=lambda i: self.tracker.sigma_rels[i])]
        self._model = copy.deepcopy(model).eval().requires_grad_(False)
        self._stale = False
        self._scratch = None  # the module `reconstructed` loads each reconstruction into

    @property
    def eval_sigma_rel(self) -> float:
        return self.tracker.sigma_rels[self.tracker.keys.index(self.eval_profile)]

    @property
    def model(self) -> torch.nn.Module:
        """The evaluated profile as a module (before the first update: the initial weights, or those given by
        --init-from; the power EMA itself never averages the initial weights)."""
        if self._stale:
            self._model.load_state_dict(self.tracker.profile_state_dict(self.eval_profile))
            self._stale = False
        return self._model

    def update(self, model: torch.nn.Module, step: int = 0, images_seen: int | None = None) -> None:
        if images_seen is None:
            raise ValueError("the power EMA needs images_seen (its time axis)")
        self.tracker.update(model, images_seen)
        self._stale = True

    def snapshot(self) -> dict:
        """`PowerEMA.snapshot(snapshot_dtype)`, on the CPU (for `phema.save_snapshot`)."""
        return self.tracker.snapshot(self.snapshot_dtype)

    def state_dict(self) -> dict:
        """The evaluated profile's weights (a bare state_dict, as a classic EMA's)."""
        return self.model.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        """Load weights into the evaluated model (as --init-from does); the tracker is restored by
        `load_tracker_state`."""
        self.model.load_state_dict(sd)

    def tracker_state(self) -> dict:
        return self.tracker.state_dict()

    def reconstructed(self, sigma_rels, snapshot_dir: str):
        """Yield (sigma_rel, module) for each sigma_rel: the EMA of that width now (at the tracker's time), from
        the snapshots in `snapshot_dir` up to now, plus the profiles' current float32 state where no file is at now
        (no later file is opened; every sigma_rel in one pass over the files). The module is one scratch copy of
        the model, reloaded for each sigma_rel."""
        import os

        from .phema import load_snapshots, reconstruct_many, snapshot_entries

        now = self.tracker.t
        snaps = load_snapshots(snapshot_dir, upto_images=now, mmap=True) if os.path.isdir(snapshot_dir) else []
        entries = snapshot_entries(snaps)
        if not any(float(e["t"]) == now for e in entries):  # no file at this point: the live profiles stand in
            entries += snapshot_entries(self.tracker.snapshot())
        if self._scratch is None:
            self._scratch = copy.deepcopy(self.model)
        for s, sd in zip(sigma_rels, reconstruct_many(entries, [float(s) for s in sigma_rels], now)):
            self._scratch.load_state_dict(sd)
            yield float(s), self._scratch

    def load_tracker_state(self, sd: dict) -> None:
        self.tracker.load_state_dict(sd)
        self._stale = self.tracker.num_updates > 0


def make_ema(train_cfg, model: torch.nn.Module):
    """The EMA a TrainConfig asks for: `EMA(ema_rate, ema_warmup)` or a `PowerEMAModel` (train.ema.type power)."""
    e = train_cfg.ema
    if e.type == "power":
        return PowerEMAModel(model, e.sigma_rels, SNAPSHOT_DTYPES[e.snapshot_dtype])
    return EMA(model, train_cfg.ema_rate, warmup=train_cfg.ema_warmup)
