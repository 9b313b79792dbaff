"""Noise schedules exactly as ADM (improved-/guided-diffusion) defines them, in float64.

All arrays have shape [T] and are indexed by the timestep t in 0..T-1.
"""
import math

import numpy as np

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """betas[i] = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), shape [T]."""
    t1 = np.arange(num_timesteps, dtype=np.float64) / num_timesteps
    t2 = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
    ab = np.vectorize(alpha_bar, otypes=[np.float64])
    return np.minimum(1.0 - ab(t2) / ab(t1), max_beta)


def cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """ADM's `linear` (scaled so any T matches T=1000's endpoints) or `cosine` schedule, shape [T]."""
    if num_timesteps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)
    raise ValueError(f"unknown noise_schedule {name!r} (expected one of {', '.join(SCHEDULES)})")


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def snr_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """SNR(t) = alpha_bar / (1 - alpha_bar), written as the official code does: 1/(1-alpha_bar) - 1."""
    return 1.0 / (1.0 - alphas_cumprod) - 1.0


def named_snr(name: str, num_timesteps: int) -> np.ndarray:
    """SNR(t) of a named schedule, shape [T] (for plots and tables)."""
    return snr_from_alphas_cumprod(alphas_cumprod_from_betas(get_named_beta_schedule(name, num_timesteps)))
