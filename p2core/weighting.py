"""Per-timestep loss weightings on the epsilon-MSE, as functions of SNR (one class, one job).

P2 (Choi et al. 2022): w = (k + SNR)^-gamma; gamma = 0 is the uniform baseline.
Min-SNR (Hang et al. 2023), epsilon-prediction form: w = min(SNR, gamma) / SNR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

WEIGHTINGS = ("p2", "min_snr")


class SNRPhase(NamedTuple):
    """One of the paper's stages of training, the timesteps with low <= SNR(t) < high."""
    name: str
    low: float
    high: float


# The paper's three stages (Choi et al. 2022, Sec. 3): coarse features at SNR < 1e-2, perceptually rich content
# between 1e-2 and 1, clean-up of imperceptible detail above 1. The one definition: the trainer's per-phase losses,
# the weighting plot's dashed lines and the sweep report all read it.
SNR_PHASES = (SNRPhase("coarse", 0.0, 1e-2), SNRPhase("content", 1e-2, 1.0), SNRPhase("cleanup", 1.0, math.inf))
SNR_PHASE_NAMES = tuple(p.name for p in SNR_PHASES)
SNR_PHASE_BOUNDARIES = tuple(p.low for p in SNR_PHASES[1:])  # (1e-2, 1.0): the inner edges, increasing


def snr_phase(snr: np.ndarray) -> np.ndarray:
    """Index into SNR_PHASES of each SNR: int64 array of snr's shape (low edge inclusive, as np.digitize)."""
    return np.digitize(np.asarray(snr, dtype=np.float64), SNR_PHASE_BOUNDARIES)


@dataclass(frozen=True)
class P2Weighting:
    p2_gamma: float = 0.0
    p2_k: float = 1.0

    def __post_init__(self):
        validate_p2(self.p2_gamma, self.p2_k)

    def __call__(self, snr: np.ndarray) -> np.ndarray:
        snr = np.asarray(snr, dtype=np.float64)
        return 1.0 / (self.p2_k + snr) ** self.p2_gamma

    @property
    def label(self) -> str:
        return f"P2 gamma={self.p2_gamma:g}, k={self.p2_k:g}"


@dataclass(frozen=True)
class MinSNRWeighting:
    min_snr_gamma: float = 5.0

    def __post_init__(self):
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")

    def __call__(self, snr: np.ndarray) -> np.ndarray:
        snr = np.asarray(snr, dtype=np.float64)
        return np.minimum(snr, self.min_snr_gamma) / snr

    @property
    def label(self) -> str:
        return f"Min-SNR gamma={self.min_snr_gamma:g}"


def validate_p2(p2_gamma: float, p2_k: float) -> None:
    if p2_gamma < 0:
        raise ValueError(f"p2_gamma must be >= 0, got {p2_gamma}")
    if p2_k < 0:
        raise ValueError(f"p2_k must be >= 0, got {p2_k}")
    if p2_gamma > 0 and p2_k == 0:
        raise ValueError("p2_k must be > 0 when p2_gamma > 0 (the weight is infinite where SNR -> 0)")


def make_weighting(weighting: str = "p2", p2_gamma: float = 0.0, p2_k: float = 1.0, min_snr_gamma: float = 5.0):
    if weighting == "p2":
        return P2Weighting(float(p2_gamma), float(p2_k))
    if weighting == "min_snr":
        return MinSNRWeighting(float(min_snr_gamma))
    raise ValueError(f"unknown weighting {weighting!r} (expected one of {', '.join(WEIGHTINGS)})")


def plot_weighting(path: str, curves: list[tuple[str, np.ndarray, np.ndarray]], title: str = "") -> str:
    """Write weight vs SNR (log-log, the paper's Fig. 3 style) as PNG, atomically. curves: (label, snr[T], w[T])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, snr, w in curves:
        ax.plot(snr, w, label=label)
    for x in SNR_PHASE_BOUNDARIES:  # the paper's three stages of training
        ax.axvline(x, color="grey", lw=0.7, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SNR(t)")
    ax.set_ylabel("loss weight on epsilon-MSE")
    ax.set_title(title or "Weighting vs SNR")
    ax.legend(fontsize=8)
    from .atomic import save_figure

    return save_figure(fig, path)
