"""Post-hoc EMA: power-function EMA profiles during training, any EMA reconstructed afterwards.

This is the math core of the "power function EMA" of Karras et al. 2024, *Analyzing and Improving the Training
Dynamics of Diffusion Models* (EDM2, arXiv 2312.02696, section 3 and appendix C). It is an independent
implementation written from the paper's definitions (no code taken from NVlabs/edm2 or from ema-pytorch).

Time ``t`` is measured in images seen (the trainer counts images), ``t > 0``; a training step "reaches" time ``t``
when its update is applied and the images count becomes ``t``.

Definitions
-----------
Power EMA with exponent ``gamma``
    The EMA at time ``t`` is the average of the weights ``theta_tau`` over the training steps ``tau <= t``, with
    weights proportional to ``tau ** gamma``. Discretely, with the running sum ``S_t = sum_{steps tau <= t}
    tau ** gamma``, a step reaching ``t`` with new weights ``theta_t`` does::

        ema <- ema + (t ** gamma / S_t) * (theta_t - ema)          (i.e. beta_t = S_prev / S_t)

    which equals the weighted average exactly. The initial weights (``tau = 0``) get weight ``0 ** gamma = 0`` and
    are never part of the average (the first update sets ``ema = theta_t``). To avoid overflow of ``S_t``
    (``tau ** gamma`` is about 1e150 for 1e9 images at gamma 17) the state keeps ``R_t = S_t / t ** gamma``, updated
    by ``R_t = R_prev * (t_prev / t) ** gamma + 1``; the step weight is ``1 / R_t``. This is the same recursion.

Continuous kernel and sigma_rel
    The continuous limit of the power EMA at time ``t`` is the density
    ``p(tau) = (gamma + 1) tau ** gamma / t ** (gamma + 1)`` on ``[0, t]``. Its standard deviation relative to ``t``
    is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 (gamma + 3)))``. sigma_rel is *not* monotone on all of
    ``gamma > -1``: it rises from 0 at ``gamma = -1`` to its maximum ``phi ** -2.5 = 0.30028...`` at
    ``gamma* = (sqrt 5 - 3) / 2 = -0.38197...`` (phi the golden ratio) and then decreases to 0. The inverse
    ``sigma_rel_to_gamma`` returns the root on the decreasing branch ``gamma >= gamma*`` (the one that weights the
    recent past most, as EDM2 does); it is defined for ``0 < sigma_rel <= 0.30028``. EDM2's pairs hold:
    sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> gamma 6.94.

Classic EMA rate (ADM's ``ema_rate``)
    ``ema <- r * ema + (1 - r) * theta`` once per step of batch ``b`` puts weight proportional to
    ``r ** ((t - tau) / b)`` on the weights of the step at ``tau``, plus the share ``r ** (t / b)`` of the initial
    weights. As a target kernel (``ClassicRate(r, b)``) the initial share is dropped and the rest renormalised:
    ``q(tau) = lam * exp(-lam (t - tau)) / (1 - exp(-lam t))`` on ``[0, t]`` with ``lam = -ln(r) / b`` per image.
    For runs much longer than ``b / (1 - r)`` images the dropped share is negligible; for shorter ones a classic EMA
    is still dominated by its initial weights and no reconstruction from trained snapshots can reproduce that.

Post-hoc reconstruction
    During training ``PowerEMA`` tracks two (or more) profiles and its ``snapshot()`` is saved every N images.
    Afterwards, for a target kernel ``q`` at time ``T`` (a sigma_rel, or a ``ClassicRate``), ``solve_weights``
    picks the weights ``w`` minimising ``|| sum_i w_i p_i - q ||_2`` over the continuous kernels ``p_i`` of the
    snapshots taken at ``t_i <= T`` (later snapshots are dropped before anything is computed, and get weight 0):
    the normal equations ``A w = c`` with the Gram matrix ``A_ij = <p_i, p_j>`` and ``c_i = <p_i, q>``.
    Inner products are closed forms:

    * two power kernels (``m = min(t_i, t_j)``):
      ``<p_i, p_j> = (g_i + 1)(g_j + 1) m ** (g_i + g_j + 1) / ((g_i + g_j + 1) t_i ** (g_i + 1) t_j ** (g_j + 1))``,
      evaluated in logs with all times divided by ``T`` (the weights are invariant under that scaling);
    * a power kernel at ``t_i <= T`` and the classic kernel: with ``a = lam * t_i``,
      ``(g + 1) * int_0^1 s ** g exp(-a (1 - s)) ds = E[(g + 1) / (g + 1 + K)]`` for ``K ~ Poisson(a)`` (a Kummer
      form of the incomplete gamma function; every term is positive, so it is summed stably around the Poisson
      mode), and ``<p_i, q> = lam * exp(-lam (T - t_i)) / (1 - exp(-lam T)) * E[...]``.

    Neighbouring snapshots have nearly collinear kernels, so ``A`` is badly conditioned. The solve scales ``A`` to
    unit diagonal (``M = D^-1/2 A D^-1/2``) and solves ``(M + ridge I) v = D^-1/2 c``, ``w = D^-1/2 v`` with a
    small relative ridge (default 1e-6): it changes the kernel fit negligibly while keeping the weights bounded, so
    that fp16/bf16 rounding of the snapshots and the training noise are not amplified.
    ``reconstruct`` then forms ``sum_i w_i * state_dict_i`` for the parameters (buffers are copied from the latest
    snapshot used).

The discrete EMA differs from its continuous kernel by O(step / (sigma_rel * t)); with enough steps per kernel
width this is far below the fit error.

Snapshot files (training with ``train.ema.type: power``)
    The trainer writes ``PowerEMA.snapshot(dtype)`` every ``train.ema.snapshot_every_images`` images (and at the
    end) to ``<out_dir>/ema_snapshots/snap_<images:012d>.pt`` (``save_snapshot``, atomic): a dict ``{"format":
    SNAPSHOT_FORMAT, "images_seen", "profiles": {profile_key: {"sigma_rel", "gamma", "t", "state_dict",
    "buffer_keys"}}}`` of tensors and plain values, loadable with ``torch.load(weights_only=True)``.
    ``load_snapshots(folder, upto_images)`` reads them back (only the files up to ``upto_images`` are opened) in
    the form ``reconstruct`` takes. Size: the floating tensors in the snapshot dtype, per profile: 2 bytes x
    parameter count in fp16/bf16 (4 in float32), i.e. about 190 MB per fp16 snapshot per profile for the
    93.6M-parameter P2 paper config (375 MB a file with the default two profiles); integer buffers keep their
    dtype. How to choose the interval: see p2core.config's docstring (``train.ema``).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import torch

__all__ = [
    "GAMMA_STAR", "SIGMA_REL_MAX", "ClassicRate", "PowerEMA",
    "gamma_to_sigma_rel", "sigma_rel_to_gamma", "power_kernel", "classic_kernel", "classic_sigma_rel",
    "power_ema_weight", "solve_weights", "kernel_fit_error", "reconstruct", "snapshot_entries",
    "SNAPSHOT_FORMAT", "snapshot_path", "save_snapshot", "list_snapshots", "load_snapshots", "remove_snapshots_after",
]

_PHI = (1.0 + math.sqrt(5.0)) / 2.0
GAMMA_STAR = _PHI - 2.0                 # (sqrt 5 - 3) / 2: where sigma_rel(gamma) peaks
SIGMA_REL_MAX = _PHI ** -2.5            # 0.300283...: the largest sigma_rel a power kernel has


# ------------------------------------------------------------------------------------------------ sigma_rel, gamma
def gamma_to_sigma_rel(gamma):
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) for gamma > -1; scalar or array in, same shape
    out (float64)."""
    g = np.asarray(gamma, dtype=np.float64)
    if np.any(g <= -1):
        raise ValueError(f"gamma must be > -1, got {gamma}")
    out = np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    return float(out) if out.ndim == 0 else out


def _sigma_rel_to_gamma_scalar(s: float) -> float:
    if not (0.0 < s <= SIGMA_REL_MAX * (1 + 1e-12)):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.6f}], got {s}")
    if s >= SIGMA_REL_MAX:
        return GAMMA_STAR
    # f(g) = sigma_rel(g)^2 - s^2 decreases on [GAMMA_STAR, inf); sigma_rel(g) < 1 / (g + 2) gives the upper end.
    f = lambda g: (g + 1) / ((g + 2) ** 2 * (g + 3)) - s * s
    lo, hi = GAMMA_STAR, 1.0 / s
    for _ in range(200):                 # bisection to the float64 resolution of gamma
        mid = 0.5 * (lo + hi)
        if mid == lo or mid == hi:
            break
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return lo if abs(f(lo)) <= abs(f(hi)) else hi


def sigma_rel_to_gamma(sigma_rel):
    """The gamma >= GAMMA_STAR with gamma_to_sigma_rel(gamma) == sigma_rel, by bisection (robust, float64 exact to a
    few ulps). Defined for 0 < sigma_rel <= SIGMA_REL_MAX; scalar or array in, same shape out."""
    s = np.asarray(sigma_rel, dtype=np.float64)
    out = np.vectorize(_sigma_rel_to_gamma_scalar, otypes=[np.float64])(s)
    return float(out) if out.ndim == 0 else out


# ------------------------------------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class ClassicRate:
    """ADM's classic EMA: ``ema <- rate * ema + (1 - rate) * theta`` once per step of ``batch_size`` images."""
    rate: float
    batch_size: int

    def __post_init__(self):
        if not (0.0 < self.rate < 1.0) or self.batch_size <= 0:
            raise ValueError(f"need 0 < rate < 1 and batch_size > 0, got {self}")

    @property
    def lam(self) -> float:
        """Decay per image: the kernel is proportional to exp(-lam (t - tau))."""
        return -math.log(self.rate) / self.batch_size


def _as_target(target) -> Union[float, ClassicRate]:
    if isinstance(target, ClassicRate):
        return target
    if isinstance(target, Mapping):
        return ClassicRate(float(target["rate"]), int(target["batch_size"]))
    return float(target)


def power_kernel(tau, t: float, gamma: float) -> np.ndarray:
    """Density of the power EMA at time t: (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], 0 outside. tau: any
    shape; returns float64 of that shape."""
    tau = np.asarray(tau, dtype=np.float64)
    s = np.clip(tau / t, 0.0, None)
    out = (gamma + 1) / t * np.power(s, gamma, where=s > 0, out=np.zeros_like(s))
    return np.where((tau > 0) & (tau <= t), out, 0.0)


def classic_kernel(tau, t: float, spec: ClassicRate) -> np.ndarray:
    """Density of the classic EMA at time t without the initial weights' share, renormalised:
    lam exp(-lam (t - tau)) / (1 - exp(-lam t)) on [0, t], 0 outside. tau: any shape; float64 of that shape."""
    tau = np.asarray(tau, dtype=np.float64)
    lam = spec.lam
    out = lam * np.exp(-lam * (t - tau)) / -math.expm1(-lam * t)
    return np.where((tau >= 0) & (tau <= t), out, 0.0)


def classic_sigma_rel(spec: ClassicRate, t: float) -> float:
    """Standard deviation / t of ``classic_kernel`` at time t (to compare a classic rate with power profiles)."""
    x = spec.lam * t                     # u = (t - tau) / t has density x exp(-x u) / (1 - exp(-x)) on [0, 1]
    if x < 1e-4:                         # nearly uniform: var 1/12 - x^2/720 + O(x^4)
        return math.sqrt(1.0 / 12.0 - x * x / 720.0)
    em = -math.expm1(-x)                 # 1 - e^-x
    var = 1.0 / x ** 2 - math.exp(-x) / em ** 2
    return math.sqrt(max(var, 0.0))


def power_ema_weight(r_prev: float, t_prev: float, t: float, gamma: float) -> tuple[float, float]:
    """One step of the exact power EMA recursion. With ``R = S / t^gamma`` (``S`` the running sum of tau^gamma over
    steps; R_prev = 0 before the first step) returns ``(w, R_t)`` with ``R_t = R_prev (t_prev / t)^gamma + 1`` and
    ``w = t^gamma / S_t = 1 / R_t``, the lerp weight: ``ema <- ema + w (theta_t - ema)``."""
    if not t > 0:
        raise ValueError(f"time must be > 0, got {t}")
    if r_prev == 0.0:
        r = 1.0
    else:
        if not t > t_prev:
            raise ValueError(f"time must increase: {t_prev} -> {t}")
        r = r_prev * (t_prev / t) ** gamma + 1.0
    return 1.0 / r, r


# ------------------------------------------------------------------------------------------------ least squares
def _power_gram(tn: np.ndarray, g: np.ndarray) -> np.ndarray:
    """<p_i, p_j> for power kernels at normalised times tn (n,) with exponents g (n,): (n, n) float64."""
    gi, gj = g[:, None], g[None, :]
    ti, tj = tn[:, None], tn[None, :]
    m = np.minimum(ti, tj)
    e = gi + gj + 1
    logv = np.log(gi + 1) + np.log(gj + 1) + e * np.log(m) - np.log(e) - (gi + 1) * np.log(ti) - (gj + 1) * np.log(tj)
    return np.exp(logv)


def _poisson_mean_ratio(a: float, g: float) -> float:
    """E[(g + 1) / (g + 1 + K)], K ~ Poisson(a) = (g + 1) int_0^1 s^g exp(-a (1 - s)) ds."""
    if a <= 0:
        return 1.0
    half = 12.0 * math.sqrt(a) + 40.0
    k = np.arange(max(0, int(a - half)), int(a + half) + 1, dtype=np.float64)
    logpmf = k * math.log(a) - a - np.array([math.lgamma(x + 1) for x in k])
    return float(np.sum(np.exp(logpmf) * (g + 1) / (g + 1 + k)))


def _cross(tn: np.ndarray, g: np.ndarray, target_time: float, target) -> np.ndarray:
    """<p_i, q> for the snapshot kernels (normalised times tn <= 1) and the target kernel at normalised time 1."""
    if isinstance(target, ClassicRate):
        lam = target.lam * target_time   # per unit of normalised time
        pref = lam / -math.expm1(-lam)
        return np.array([pref * math.exp(-lam * (1.0 - ti)) * _poisson_mean_ratio(lam * ti, gi)
                         for ti, gi in zip(tn, g)])
    gr = sigma_rel_to_gamma(target)
    return _power_gram(np.append(tn, 1.0), np.append(g, gr))[:-1, -1]


def _self_norm(target_time: float, target) -> float:
    """<q, q> at normalised time 1."""
    if isinstance(target, ClassicRate):
        x = target.lam * target_time
        return x * (1 + math.exp(-x)) / (2 * -math.expm1(-x))
    gr = sigma_rel_to_gamma(target)
    return (gr + 1) ** 2 / (2 * gr + 1)


def _prepare(snapshot_times, snapshot_gammas, target_time):
    t = np.asarray(snapshot_times, dtype=np.float64).reshape(-1)
    g = np.asarray(snapshot_gammas, dtype=np.float64).reshape(-1)
    if t.shape != g.shape:
        raise ValueError(f"{t.shape[0]} snapshot times but {g.shape[0]} gammas")
    if np.any(t <= 0) or np.any(g <= -1):
        raise ValueError("snapshot times must be > 0 and gammas > -1")
    if not target_time > 0:
        raise ValueError(f"target_time must be > 0, got {target_time}")
    used = np.flatnonzero(t <= target_time)
    if used.size == 0:
        raise ValueError(f"no snapshot at or before {target_time} images")
    return t, g, used


def solve_weights(snapshot_times: Sequence[float], snapshot_gammas: Sequence[float], target_time: float,
                  target, ridge: float = 1e-6) -> np.ndarray:
    """Least-squares weights of the snapshots whose combination best matches the target EMA at target_time.

    snapshot_times, snapshot_gammas: (n,) images seen and exponent of each snapshot (any mix of profiles).
    target: a sigma_rel (float) or a ``ClassicRate`` (or a mapping with ``rate`` and ``batch_size``).
    Returns (n,) float64 weights; snapshots taken after target_time get exactly 0 and enter no computation.
    ``ridge``: relative Tikhonov term on the unit-diagonal Gram matrix (see the module docstring); 0 gives the
    plain least-squares solution (by lstsq).
    """
    target = _as_target(target)
    t, g, used = _prepare(snapshot_times, snapshot_gammas, target_time)
    tn, gu = t[used] / target_time, g[used]
    A = _power_gram(tn, gu)
    c = _cross(tn, gu, target_time, target)
    d = 1.0 / np.sqrt(np.diag(A))
    M = A * d[:, None] * d[None, :]
    rhs = c * d
    if ridge > 0:
        v = np.linalg.solve(M + ridge * np.eye(len(used)), rhs)
    else:
        v = np.linalg.lstsq(M, rhs, rcond=None)[0]
    w = np.zeros(t.shape[0])
    w[used] = v * d
    return w


def kernel_fit_error(snapshot_times, snapshot_gammas, target_time: float, target, weights) -> float:
    """Relative L2 error || sum_i w_i p_i - q || / || q || of a combination of snapshot kernels (closed form)."""
    target = _as_target(target)
    t, g, used = _prepare(snapshot_times, snapshot_gammas, target_time)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)[used]
    tn, gu = t[used] / target_time, g[used]
    qq = _self_norm(target_time, target)
    err2 = w @ _power_gram(tn, gu) @ w - 2 * w @ _cross(tn, gu, target_time, target) + qq
    return math.sqrt(max(err2, 0.0) / qq)


# ------------------------------------------------------------------------------------------------ reconstruction
def snapshot_entries(snapshots) -> list[dict]:
    """Flatten snapshots into per-profile entries. Accepts one ``PowerEMA.snapshot()`` dict, an iterable of them,
    or of entries (dicts with ``state_dict``, ``t``, ``gamma``)."""
    if isinstance(snapshots, Mapping):
        snapshots = [snapshots]
    out = []
    for s in snapshots:
        if "state_dict" in s:
            out.append(s)
        else:
            out.extend(s.values())
    return out


@torch.no_grad()
def reconstruct(snapshots, target, at_images: float, dtype: torch.dtype = torch.float32,
                ridge: float = 1e-6) -> dict:
    """The state_dict of the EMA ``target`` (sigma_rel or ``ClassicRate``) at ``at_images`` from snapshots.

    Only snapshot entries with ``t <= at_images`` are read (their tensors are never touched otherwise). Parameters
    are accumulated as ``sum_i w_i * sd_i[k]`` in float32 (float64 if ``dtype`` is float64) and cast to ``dtype``;
    buffers (``buffer_keys`` of the entries) are copied from the latest snapshot used, in their own dtype.
    Returns a state_dict with the snapshots' keys, on the snapshots' device.
    """
    return reconstruct_many(snapshots, [target], at_images, dtype, ridge)[0]


@torch.no_grad()
def reconstruct_many(snapshots, targets, at_images: float, dtype: torch.dtype = torch.float32,
                     ridge: float = 1e-6) -> list[dict]:
    """``[reconstruct(snapshots, t, at_images) for t in targets]`` with one pass over the snapshot tensors (each is
    read once for all targets: memory-mapped snapshot files are paged in once per evaluation, not once per target)."""
    entries = [e for e in snapshot_entries(snapshots) if float(e["t"]) <= at_images]
    if not entries:
        raise ValueError(f"no snapshot at or before {at_images} images")
    ws = [solve_weights([e["t"] for e in entries], [e["gamma"] for e in entries], at_images, t, ridge=ridge)
          for t in targets]
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    latest = max(entries, key=lambda e: float(e["t"]))
    buffer_keys = set(latest.get("buffer_keys", ()))
    keys = list(latest["state_dict"].keys())
    outs = [{k: latest["state_dict"][k].clone() for k in keys if k in buffer_keys} for _ in targets]
    for i, e in enumerate(entries):
        sd = e["state_dict"]
        if list(sd.keys()) != keys:
            raise ValueError("snapshots of different models (state_dict keys differ)")
        for k in keys:
            if k in buffer_keys:
                continue
            x = sd[k].to(acc_dtype)
            for out, w in zip(outs, ws):
                if k in out:
                    out[k].add_(x, alpha=float(w[i]))
                else:
                    out[k] = x.mul(float(w[i]))
    return [{k: (o[k] if k in buffer_keys else o[k].to(dtype)) for k in keys} for o in outs]


# ------------------------------------------------------------------------------------------------------ tracker
class PowerEMA:
    """Tracks power-EMA profiles of a module's parameters (shadow copies in ``shadow_dtype``, float32 by default);
    buffers are copied (shared by all profiles, not averaged).

    ``update(model, images_seen)`` after each optimiser step (images_seen strictly increasing, > 0);
    ``snapshot(dtype=None)`` -> ``{profile_key: {"sigma_rel", "gamma", "t", "state_dict", "buffer_keys"}}`` with
    cloned tensors (on CPU by default) for saving; ``state_dict()``/``load_state_dict()`` for exact resume (shadows,
    running sums, time). Profiles are given by ``sigma_rels`` or directly by ``gammas``.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10), *,
                 gammas: Sequence[float] | None = None, shadow_dtype: torch.dtype = torch.float32):
        if gammas is None:
            self.sigma_rels = tuple(float(s) for s in sigma_rels)
            self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        else:
            self.gammas = tuple(float(g) for g in gammas)
            self.sigma_rels = tuple(gamma_to_sigma_rel(g) for g in self.gammas)
        self.keys = tuple(f"{s:.4g}" for s in self.sigma_rels)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"duplicate profiles {self.keys}")
        self.shadow_dtype = shadow_dtype
        sd = model.state_dict(keep_vars=True)
        params = list(model.parameters())
        index = {id(p): i for i, p in enumerate(params)}
        # state_dict key -> ("p", parameter index) or ("b", buffer key); shared parameters appear under each name
        self._layout = [("p", index[id(v)]) if id(v) in index else ("b", k) for k, v in sd.items()]
        self._sd_keys = list(sd.keys())
        self.buffer_keys = [k for k, (kind, _) in zip(self._sd_keys, self._layout) if kind == "b"]
        with torch.no_grad():
            self.shadows = [[p.detach().to(shadow_dtype, copy=True) for p in params] for _ in self.gammas]
            self.buffers = {k: sd[k].detach().clone() for k in self.buffer_keys}
        self.t = 0.0                     # images seen at the last update
        self.r = [0.0] * len(self.gammas)  # R = S / t^gamma per profile (0: no update yet)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, images_seen: float) -> None:
        t = float(images_seen)
        if not t > self.t:
            raise ValueError(f"images_seen must increase and be > 0: {self.t} -> {t}")
        src = [p.detach() for p in model.parameters()]
        if len(src) != len(self.shadows[0]):
            raise ValueError(f"model has {len(src)} parameters, the tracker {len(self.shadows[0])}")
        if any(p.dtype != self.shadow_dtype for p in src):
            src = [p.to(self.shadow_dtype) for p in src]
        for i, g in enumerate(self.gammas):
            w, self.r[i] = power_ema_weight(self.r[i], self.t, t, g)
            torch._foreach_lerp_(self.shadows[i], src, w)
        if self.buffers:
            msd = model.state_dict()
            for k, b in self.buffers.items():
                b.copy_(msd[k])
        self.t = t
        self.num_updates += 1

    def profile_state_dict(self, profile: int | str, dtype: torch.dtype | None = None, device=None) -> dict:
        """The state_dict of one profile (its index or key, e.g. "0.1"): copies of the shadows (floating tensors
        in ``dtype`` if given) and buffers, on ``device`` (default: where the tracker keeps them)."""
        i = self.keys.index(profile) if isinstance(profile, str) else int(profile)
        return self._profile_sd(i, dtype, device)

    def _profile_sd(self, i: int, dtype, device) -> dict:
        out = {}
        for k, (kind, j) in zip(self._sd_keys, self._layout):
            x = self.shadows[i][j] if kind == "p" else self.buffers[k]
            cast = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
            y = x.detach().to(device=device, dtype=cast)
            out[k] = y.clone() if y.data_ptr() == x.data_ptr() else y
        return out

    @torch.no_grad()
    def snapshot(self, dtype: torch.dtype | None = None, device="cpu") -> dict:
        """Per profile the EMA's state_dict (floating tensors cast to ``dtype`` if given: fp16/bf16 halve the
        bytes), its time ``t`` (images), ``gamma``, ``sigma_rel`` and ``buffer_keys``. Tensors are copies."""
        if self.num_updates == 0:
            raise ValueError("snapshot before the first update (t = 0 has no power EMA)")
        return {key: {"sigma_rel": s, "gamma": g, "t": self.t, "buffer_keys": list(self.buffer_keys),
                      "state_dict": self._profile_sd(i, dtype, device)}
                for i, (key, s, g) in enumerate(zip(self.keys, self.sigma_rels, self.gammas))}

    def state_dict(self) -> dict:
        """Everything for an exact resume; tensors and plain Python values only (loads with weights_only=True)."""
        return {"format": "p2sweep/phema/1", "gammas": list(self.gammas), "sigma_rels": list(self.sigma_rels),
                "t": self.t, "r": list(self.r), "num_updates": self.num_updates,
                "shadows": [[x.detach().clone() for x in sh] for sh in self.shadows],
                "buffers": {k: b.detach().clone() for k, b in self.buffers.items()}}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        if list(sd["gammas"]) != list(self.gammas):
            raise ValueError(f"profiles differ: saved gammas {sd['gammas']}, this tracker {list(self.gammas)}")
        if len(sd["shadows"]) != len(self.shadows) or any(len(a) != len(b) for a, b in
                                                           zip(sd["shadows"], self.shadows)):
            raise ValueError("saved shadows do not match this model")
        if set(sd["buffers"]) != set(self.buffers):
            raise ValueError("saved buffers do not match this model")
        for mine, saved in zip(self.shadows, sd["shadows"]):
            for a, b in zip(mine, saved):
                if a.shape != b.shape:
                    raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
                a.copy_(b)
        for k, b in self.buffers.items():
            b.copy_(sd["buffers"][k])
        self.t = float(sd["t"])
        self.r = [float(x) for x in sd["r"]]
        self.num_updates = int(sd["num_updates"])


# ------------------------------------------------------------------------------------------------ snapshot files
SNAPSHOT_FORMAT = "p2sweep/phema-snapshot/1"
SNAPSHOT_NAME = re.compile(r"^snap_(\d+)\.pt$")  # snap_<images:012d>.pt


def snapshot_path(folder: str, images: int) -> str:
    return os.path.join(folder, f"snap_{int(images):012d}.pt")


def save_snapshot(snapshot: Mapping, folder: str) -> str:
    """Write one ``PowerEMA.snapshot()`` to ``folder/snap_<images:012d>.pt`` atomically (p2core.atomic); returns
    the path. All profiles of a snapshot share one time, an integer image count."""
    from .atomic import atomic_write

    times = {float(e["t"]) for e in snapshot.values()}
    if len(times) != 1:
        raise ValueError(f"a snapshot's profiles must share one time, got {sorted(times)}")
    t = times.pop()
    if not t.is_integer():
        raise ValueError(f"snapshot time must be a whole number of images, got {t}")
    obj = {"format": SNAPSHOT_FORMAT, "images_seen": int(t), "profiles": dict(snapshot)}
    return atomic_write(snapshot_path(folder, int(t)), lambda f: torch.save(obj, f))


def list_snapshots(folder: str) -> list[tuple[int, str]]:
    """(images, path) of the snapshot files in ``folder``, oldest first ([] for a missing folder)."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        m = SNAPSHOT_NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(out)


def load_snapshots(folder: str, upto_images: float | None = None, map_location="cpu", mmap: bool = False) -> list[dict]:
    """The snapshots saved in ``folder`` with images <= ``upto_images`` (all if None), oldest first, each a
    ``PowerEMA.snapshot()`` dict (``{profile_key: {"sigma_rel", "gamma", "t", "state_dict", "buffer_keys"}}``),
    ready for ``reconstruct``. Later files are never opened; files load with ``torch.load(weights_only=True)``
    (``mmap=True``: tensors are read from the file as ``reconstruct`` uses them, not all held in memory)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no snapshot folder")
    out = []
    for images, path in list_snapshots(folder):
        if upto_images is not None and images > upto_images:
            break
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        if not isinstance(obj, dict) or obj.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path}: not a p2sweep power-EMA snapshot")
        if int(obj["images_seen"]) != images:
            raise ValueError(f"{path}: holds the snapshot at {obj['images_seen']} images, not {images}")
        out.append(obj["profiles"])
    return out


def remove_snapshots_after(folder: str, images: int) -> list[str]:
    """Delete the snapshot files taken after ``images`` (a run resumed from a checkpoint at ``images`` writes them
    again); returns the removed paths."""
    gone = [p for n, p in list_snapshots(folder) if n > images]
    for p in gone:
        os.unlink(p)
    return gone
