"""Exponential moving average of parameters: ema <- rate * ema + (1 - rate) * param (ADM's update).

With warmup (off by default, as in ADM) the rate is min(rate, (1 + step) / (10 + step)), so that short runs (CPU
presets, the first ASHA rungs of a sweep) are not dominated by the initial weights.
"""
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

    def update(self, model: torch.nn.Module, step: int = 0) -> None:
        ema_p = list(self.model.parameters())
        src = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src, 1.0 - self.rate_at(step))
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)
