"""Exponential moving average of parameters: ema <- rate * ema + (1 - rate) * param (ADM's update)."""
import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, rate: float = 0.9999):
        self.rate = rate
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_p = list(self.model.parameters())
        src = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src, 1.0 - self.rate)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)
