"""Post-hoc (power-function) EMA against closed forms and directly tracked averages, not against itself."""
import io
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from p2core.phema import (GAMMA_STAR, SIGMA_REL_MAX, ClassicRate, PowerEMA, classic_kernel, classic_sigma_rel,
                          gamma_to_sigma_rel, kernel_fit_error, power_kernel, reconstruct, sigma_rel_to_gamma,
                          snapshot_entries, solve_weights)


class Vec(torch.nn.Module):
    """The model of a synthetic trajectory: one parameter vector."""

    def __init__(self, d, dtype=torch.float64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=dtype))


def small_net(dtype=torch.float32):
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3)).to(dtype)


def randomize_(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            else:
                b.add_(1)


def std_rel_by_quadrature(density, t):
    m0 = integrate.quad(density, 0, t, limit=200)[0]
    m1 = integrate.quad(lambda x: x * density(x), 0, t, limit=200)[0]
    m2 = integrate.quad(lambda x: x * x * density(x), 0, t, limit=200)[0]
    return m0, math.sqrt(m2 / m0 - (m1 / m0) ** 2) / t


# ------------------------------------------------------------------------------------------- (1) the definition
def test_power_ema_update_equals_weighted_average_over_steps():
    gen = torch.Generator().manual_seed(1)
    net = small_net(torch.float64)
    gammas = (-0.2, 0.0, 3.5, sigma_rel_to_gamma(0.05))
    ema = PowerEMA(net, gammas=gammas, shadow_dtype=torch.float64)
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.integers(1, 40, size=150)).astype(np.float64)     # irregular steps (images per step)
    history = []
    for t in times:
        randomize_(net, gen)
        ema.update(net, int(t))
        history.append([p.detach().clone() for p in net.parameters()])
    snap = ema.snapshot()
    names = [n for n, _ in net.named_parameters()]
    for key, g in zip(ema.keys, gammas):
        w = (times / times[-1]) ** g
        w /= w.sum()
        for j, n in enumerate(names):
            direct = sum(wk * h[j] for wk, h in zip(w, history))
            got = snap[key]["state_dict"][n]
            assert snap[key]["t"] == times[-1] and snap[key]["gamma"] == g
            assert torch.allclose(got, direct, rtol=0, atol=1e-10 * direct.abs().max().item()), (g, n)
        # buffers are the model's last buffers, not averaged
        for n, b in net.named_buffers():
            assert torch.equal(snap[key]["state_dict"][n], b)
    with pytest.raises(ValueError):
        ema.update(net, int(times[-1]))                                      # time must increase


# ------------------------------------------------------------------------------------- (2) sigma_rel <-> gamma
def test_sigma_rel_gamma_both_ways_and_against_quadrature():
    # EDM2's published pairs
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=1e-4)
    assert gamma_to_sigma_rel(6.94) == pytest.approx(0.10, abs=1e-4)
    # the std / t of the continuous kernel, by quadrature, at an arbitrary t
    t = 1234.5
    for g in (GAMMA_STAR, 0.0, 1.0, 6.94, 16.97, 40.0):
        mass, s = std_rel_by_quadrature(lambda x: power_kernel(x, t, g), t)
        assert mass == pytest.approx(1.0, rel=1e-9)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-8), g
        if g > GAMMA_STAR:                   # at the peak d sigma_rel / d gamma = 0: the inverse is ill-posed
            assert sigma_rel_to_gamma(s) == pytest.approx(g, rel=1e-6, abs=1e-6), g
    assert gamma_to_sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12), rel=1e-15)   # uniform average
    # both ways on grids; decreasing on the branch gamma >= GAMMA_STAR, whose peak is SIGMA_REL_MAX
    gs = np.concatenate([np.linspace(GAMMA_STAR + 0.01, 2, 50), np.geomspace(2, 1e4, 50)])
    assert np.allclose(sigma_rel_to_gamma(gamma_to_sigma_rel(gs)), gs, rtol=1e-9, atol=1e-9)
    assert sigma_rel_to_gamma(SIGMA_REL_MAX) == GAMMA_STAR
    ss = np.geomspace(1e-3, SIGMA_REL_MAX, 60)
    assert np.allclose(gamma_to_sigma_rel(sigma_rel_to_gamma(ss)), ss, rtol=1e-12)
    assert np.all(np.diff(gamma_to_sigma_rel(np.unique(gs))) < 0)
    assert gamma_to_sigma_rel(GAMMA_STAR) == pytest.approx(SIGMA_REL_MAX, rel=1e-15)
    for bad in (0.0, -0.1, 0.31):
        with pytest.raises(ValueError):
            sigma_rel_to_gamma(bad)


def test_kernel_inner_products_and_classic_sigma_rel_against_quadrature():
    T = 5000.0
    snaps = [(1800.0, 6.94), (3100.0, 16.97), (5000.0, 0.3)]
    ts, gs = [s[0] for s in snaps], [s[1] for s in snaps]
    w = np.array([0.3, -0.2, 0.9])
    targets = [0.075, 0.2, ClassicRate(0.999, 8), ClassicRate(0.99, 1)]
    for target in targets:
        q = (lambda x: classic_kernel(x, T, target)) if isinstance(target, ClassicRate) else \
            (lambda x: power_kernel(x, T, sigma_rel_to_gamma(target)))
        f = lambda x: sum(wi * power_kernel(x, ti, gi) for wi, ti, gi in zip(w, ts, gs))
        pts = sorted(set(ts))
        num = integrate.quad(lambda x: (f(x) - q(x)) ** 2, 0, T, points=pts, limit=400, epsabs=0, epsrel=1e-11)[0]
        den = integrate.quad(lambda x: q(x) ** 2, 0, T, points=pts, limit=400, epsabs=0, epsrel=1e-11)[0]
        assert kernel_fit_error(ts, gs, T, target, w) == pytest.approx(math.sqrt(num / den), rel=1e-7), target
    # a long classic EMA (Poisson terms around a large mode): 0.9999 at batch 8 over 1e7 images
    spec, T = ClassicRate(0.9999, 8), 1e7
    ts, gs, w = [0.995 * T, T], [50.0, 16.97], np.array([0.4, 0.5])
    f = lambda x: sum(wi * power_kernel(x, ti, gi) for wi, ti, gi in zip(w, ts, gs)) - classic_kernel(x, T, spec)
    lo = T - 30 / spec.lam
    num = integrate.quad(lambda x: f(x) ** 2, lo, T, points=[ts[0]], limit=400, epsabs=0, epsrel=1e-11)[0]
    num += integrate.quad(lambda x: f(x) ** 2, 0, lo, limit=400)[0]
    den = spec.lam * (1 + math.exp(-spec.lam * T)) / (2 * -math.expm1(-spec.lam * T))
    assert kernel_fit_error(ts, gs, T, spec, w) == pytest.approx(math.sqrt(num / den), rel=1e-7)
    for spec, T in ((ClassicRate(0.999, 8), 48000.0), (ClassicRate(0.9999, 8), 1e4)):
        mass, s = std_rel_by_quadrature(lambda x: classic_kernel(x, T, spec), T)
        assert mass == pytest.approx(1.0, rel=1e-9)
        assert classic_sigma_rel(spec, T) == pytest.approx(s, rel=1e-7)


# -------------------------------------------------------------------------------- synthetic training trajectory
D = 256
_A = np.random.default_rng(0).normal(size=(3, D))


def smooth_theta(t, T):
    x = t / T
    return _A[0] * np.sin(3 * x) + _A[1] * x ** 2 + _A[2] * np.cos(7 * x + 1)


def run_trajectory(steps, batch, every, sigma_rels, classic_rate=None, noise=0.3, seed=0):
    """Trains a Vec on theta_t = smooth(t) + noise; PowerEMA snapshots every `every` images. Returns the tracker,
    the snapshots, the direct snapshots at each snapshot time (all profiles) and the classic EMA (ADM's update,
    initialised with the weights at t = 0)."""
    rng = np.random.default_rng(seed)
    T = steps * batch
    model = Vec(D)
    with torch.no_grad():
        model.w.copy_(torch.from_numpy(smooth_theta(0.0, T) + noise * rng.normal(size=D)))
    ema = PowerEMA(model, sigma_rels, shadow_dtype=torch.float64)
    classic = model.w.detach().clone()
    snaps = []
    for k in range(1, steps + 1):
        t = k * batch
        with torch.no_grad():
            model.w.copy_(torch.from_numpy(smooth_theta(t, T) + noise * rng.normal(size=D)))
        ema.update(model, t)
        if classic_rate is not None:
            classic.lerp_(model.w.detach(), 1 - classic_rate)
        if t % every == 0:
            snaps.append(ema.snapshot())
    return ema, snaps, classic


def rel(a, b):
    return float((a - b).norm() / b.norm())


def only(snaps, keys):
    return [{k: v for k, v in s.items() if k in keys} for s in snaps]


# ------------------------------------------------------------------ (3) a third profile equals its reconstruction
def test_third_profile_equals_its_reconstruction_from_two_profiles():
    # 400 steps of 8 images, snapshots of 0.05 and 0.10 every 160 images (20 per profile); the 0.075 profile is
    # tracked directly. Measured relative L2 errors: float64 snapshots 1.07e-4 at the end (40 snapshots) and
    # 7.4e-4 at the middle (20 snapshots); fp16 snapshots 2.2e-4, bf16 1.35e-3 at the end. Tolerances: measured x 2.
    # For scale: the 0.05 profile differs from the 0.075 one by 0.16 at the end, 0.073 at the middle.
    ema, snaps, _ = run_trajectory(steps=400, batch=8, every=160, sigma_rels=(0.05, 0.10, 0.075))
    two = only(snaps, {"0.05", "0.1"})
    T = 3200
    for at, tol in ((T, 2.2e-4), (T // 2, 1.5e-3)):
        direct = next(s for s in snaps if s["0.075"]["t"] == at)["0.075"]["state_dict"]["w"]
        rec = reconstruct(two, 0.075, at, dtype=torch.float64)["w"]
        assert rel(rec, direct) < tol, (at, rel(rec, direct))
        nearest = next(s for s in snaps if s["0.05"]["t"] == at)["0.05"]["state_dict"]["w"]
        assert rel(nearest, direct) > 40 * tol                       # the test is not trivially satisfied
    direct = snaps[-1]["0.075"]["state_dict"]["w"]
    for dtype, tol in ((torch.float16, 4.5e-4), (torch.bfloat16, 2.7e-3)):
        cast = [{k: {**v, "state_dict": {n: x.to(dtype) for n, x in v["state_dict"].items()}} for k, v in s.items()}
                for s in two]
        assert rel(reconstruct(cast, 0.075, T)["w"].double(), direct) < tol, dtype


# ------------------------------------------------------------------ (4) no later snapshot enters a reconstruction
def test_reconstruction_at_an_earlier_point_uses_no_later_snapshot():
    _, snaps, _ = run_trajectory(steps=200, batch=8, every=160, sigma_rels=(0.05, 0.10))
    at = 800
    entries = snapshot_entries(snaps)
    times = [e["t"] for e in entries]
    gammas = [e["gamma"] for e in entries]
    w = solve_weights(times, gammas, at, 0.075)
    later = np.array(times) > at
    assert later.any() and np.all(w[later] == 0) and np.any(w[~later] != 0)
    # later snapshots' gammas do not change the weights of earlier ones
    gammas2 = [g + 5 if t > at else g for g, t in zip(gammas, times)]
    assert np.array_equal(solve_weights(times, gammas2, at, 0.075), w)
    ref = reconstruct(snaps, 0.075, at)
    poisoned = [{k: ({**v, "state_dict": {n: torch.full_like(x, float("nan")) for n, x in v["state_dict"].items()}}
                     if v["t"] > at else v) for k, v in s.items()} for s in snaps]
    got = reconstruct(poisoned, 0.075, at)
    assert torch.equal(got["w"], ref["w"])
    assert torch.equal(reconstruct([s for s in snaps if s["0.05"]["t"] <= at], 0.075, at)["w"], ref["w"])
    with pytest.raises(ValueError):
        reconstruct(snaps, 0.075, 100)                               # before the first snapshot


# ------------------------------------------------------------------ (5) a classic rate from power snapshots
def test_classic_rate_reconstruction_matches_a_classic_ema():
    # ADM's EMA with rate 0.999 at batch 8 over 6000 steps (its initial weights keep a share 0.999^6000 = 2.5e-3),
    # snapshots of 0.05 and 0.10 every 400 images (120 per profile). Measured: relative L2 error 1.93e-3 (kernel fit
    # error 9.8e-4, plus the initial share that the target kernel drops); the 0.10 profile alone is off by 0.107.
    # Tolerance: measured x 2.
    rate, batch = 0.999, 8
    ema, snaps, classic = run_trajectory(steps=6000, batch=batch, every=400, sigma_rels=(0.05, 0.10),
                                         classic_rate=rate)
    T = 48000
    rec = reconstruct(snaps, ClassicRate(rate, batch), T, dtype=torch.float64)["w"]
    assert rel(rec, classic) < 4e-3, rel(rec, classic)
    assert rel(snaps[-1]["0.1"]["state_dict"]["w"], classic) > 25 * 4e-3
    rec2 = reconstruct(snaps, {"rate": rate, "batch_size": batch}, T, dtype=torch.float64)["w"]
    assert torch.equal(rec, rec2)


# ----------------------------------------------------------------------------------------- (6) exact resume
def test_power_ema_resume_is_bit_exact():
    def run(net_seed, split):
        torch.manual_seed(0)
        net = small_net()
        gen = torch.Generator().manual_seed(net_seed)
        ema = PowerEMA(net, (0.05, 0.10))
        t = 0
        for k in range(40):
            if k == split:
                buf = io.BytesIO()
                torch.save(ema.state_dict(), buf)
                buf.seek(0)
                torch.manual_seed(123)                                # a fresh model with other weights
                ema = PowerEMA(small_net(), (0.05, 0.10))
                ema.load_state_dict(torch.load(buf, weights_only=True))
            randomize_(net, gen)
            t += 8 + (k % 3)
            ema.update(net, t)
        return ema
    a, b = run(7, split=None), run(7, split=17)
    assert a.r == b.r and a.t == b.t and a.num_updates == b.num_updates
    sa, sb = a.snapshot(), b.snapshot()
    for key in sa:
        for n in sa[key]["state_dict"]:
            assert torch.equal(sa[key]["state_dict"][n], sb[key]["state_dict"][n]), (key, n)
    with pytest.raises(ValueError):
        PowerEMA(small_net(), (0.05, 0.2)).load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------------------- (7) fp16 snapshots
def test_snapshot_in_half_precision_halves_the_bytes():
    net = small_net()
    ema = PowerEMA(net, (0.05, 0.10))
    randomize_(net, torch.Generator().manual_seed(3))
    ema.update(net, 8)

    def nbytes(sd, floating):
        return sum(x.numel() * x.element_size() for x in sd.values() if x.is_floating_point() == floating)
    full = ema.snapshot()
    for dtype in (torch.float16, torch.bfloat16):
        half = ema.snapshot(dtype=dtype)
        for key in full:
            f, h = full[key]["state_dict"], half[key]["state_dict"]
            assert nbytes(h, True) * 2 == nbytes(f, True) > 0
            assert nbytes(h, False) == nbytes(f, False)               # the integer counter stays int64
            assert h["1.num_batches_tracked"].dtype == torch.int64
            assert all(h[n].dtype == dtype for n in h if f[n].is_floating_point())
            assert all(torch.allclose(h[n].float(), f[n].float(), rtol=1e-2, atol=1e-2) for n in h)
    # snapshots are copies: a later update does not change them
    before = {n: x.clone() for n, x in full["0.05"]["state_dict"].items()}
    randomize_(net, torch.Generator().manual_seed(4))
    ema.update(net, 16)
    assert all(torch.equal(before[n], full["0.05"]["state_dict"][n]) for n in before)
    # a reconstruction from snapshots loads strictly into the model
    net.load_state_dict(reconstruct([full, ema.snapshot()], 0.07, 16), strict=True)


# ----------------------------------------------------------------------------------------- (8) snapshot files
def test_snapshot_files_round_trip_and_later_files_are_never_opened(tmp_path):
    from p2core.phema import SNAPSHOT_FORMAT, list_snapshots, load_snapshots, remove_snapshots_after, save_snapshot

    net = small_net()
    ema = PowerEMA(net, (0.05, 0.10))
    gen = torch.Generator().manual_seed(5)
    saved = []
    for t in range(8, 41, 8):
        randomize_(net, gen)
        ema.update(net, t)
        saved.append(ema.snapshot(torch.float16))
        path = save_snapshot(saved[-1], str(tmp_path))
        assert path.endswith(f"snap_{t:012d}.pt")
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == SNAPSHOT_FORMAT and obj["images_seen"] == 40 and set(obj["profiles"]) == {"0.05", "0.1"}
    got = load_snapshots(str(tmp_path))
    assert [s["0.1"]["t"] for s in got] == [8.0, 16.0, 24.0, 32.0, 40.0]
    for a, b in zip(saved, got):
        for key in a:
            assert a[key]["gamma"] == b[key]["gamma"] and a[key]["buffer_keys"] == b[key]["buffer_keys"]
            assert all(torch.equal(x, b[key]["state_dict"][n]) for n, x in a[key]["state_dict"].items())
    assert torch.equal(reconstruct(got, 0.07, 40)["0.weight"], reconstruct(saved, 0.07, 40)["0.weight"])
    (tmp_path / "snap_000000000040.pt").write_bytes(b"junk")     # a later file is never opened
    assert len(load_snapshots(str(tmp_path), upto_images=39)) == 4
    with pytest.raises(Exception):
        load_snapshots(str(tmp_path))
    assert [n for n, _ in list_snapshots(str(tmp_path))] == [8, 16, 24, 32, 40]
    assert len(remove_snapshots_after(str(tmp_path), 24)) == 2 and len(load_snapshots(str(tmp_path))) == 3
    ema.update(net, 40.5)
    with pytest.raises(ValueError, match="whole number"):
        save_snapshot(ema.snapshot(), str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_snapshots(str(tmp_path / "none"))
