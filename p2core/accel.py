"""Speed settings of a training run: `train.bf16` (true, false or "auto"), fused AdamW, the channels_last flag.

"auto" resolves from measurements on the device kind (README, "Performance"):
- bf16 autocast: on for CUDA (H100, paper config: training step 1.12x fp32; a small 8M UNet at batch 32 is
  launch-bound there and gains nothing); on for a CPU with bf16 matrix units (AMX or AVX512-BF16), where it
  measured 1.4-1.8x on the training step and 1.5-2.7x on the sampling step; off on other CPUs (bf16 emulated).
  A toy UNet (16 px, 32 channels, as in the tests and the smoke sweep) is overhead-bound and slower in bf16: those
  configs set `bf16: false`.
`train.channels_last` stays off by default: it measured mixed. CPU, bf16: +12% on the 8.0M UNet's training step but
2x slower on the 1.19M CPU preset (1-channel input); H100, paper config, bf16: training step 0.146 s vs 0.117 s,
sampling step 0.058 s vs 0.040 s (bench/results/gpu_check_h100_2026-11-26.jsonl).
fp32 AdamW always runs fused (one kernel over all parameters) where the device supports it: the same update as the
for-loop AdamW up to float rounding.
"""
from __future__ import annotations

import contextlib
import functools

import torch

AUTO = "auto"


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_units() -> bool:
    """True when the CPU has native bf16 matrix instructions (Intel AMX-BF16 or AVX512-BF16), Linux only."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def use_bf16(setting, device: torch.device) -> bool:
    if setting != AUTO:
        return bool(setting)
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units())


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA or CPU when `bf16` (already resolved), else a no-op context."""
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW as ADM's (betas 0.9/0.999, eps 1e-8), fused where torch has the kernel for the device."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
