"""Diffusion math against closed forms and hand-derived values (not against the implementation itself)."""
import math

import numpy as np
import pytest
import torch

from p2core.diffusion import create_diffusion, space_timesteps
from p2core.schedules import get_named_beta_schedule
from p2core.weighting import MinSNRWeighting, P2Weighting, make_weighting


def f_cos(t, T):
    return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2


@pytest.mark.parametrize("T", [1000, 250, 4000])
def test_linear_schedule_endpoints_scale_with_T(T):
    b = get_named_beta_schedule("linear", T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert b[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert b[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) * 1000 / T / (T - 1))


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_alphas_cumprod_telescopes_to_closed_form(T):
    d = create_diffusion(steps=T, noise_schedule="cosine")
    # prod_{i<=t} alpha_bar((i+1)/T)/alpha_bar(i/T) = f(t+1)/f(0) wherever beta was not clipped at 0.999
    closed = np.array([f_cos(t + 1, T) / f_cos(0, T) for t in range(T)])
    assert np.allclose(d.alphas_cumprod[:-1], closed[:-1], rtol=1e-10)
    assert d.betas[-1] == pytest.approx(0.999)  # alpha_bar(1) = 0 -> clipped


def test_snr_closed_form_and_p2_weight_gamma1_is_one_minus_alpha_bar():
    d = create_diffusion(noise_schedule="linear", p2_gamma=1.0, p2_k=1.0)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    assert np.allclose(d.snr, ab / (1 - ab), rtol=1e-9)
    # 1/(1 + SNR) = 1 - alpha_bar exactly
    assert np.allclose(d.loss_weight, 1 - ab, rtol=1e-9)


@pytest.mark.parametrize("sched,gamma,expected", [("linear", 0.5, 0.81), ("linear", 1.0, 0.72),
                                                  ("cosine", 0.5, 0.64), ("cosine", 1.0, 0.50)])
def test_mean_p2_weight_matches_published_values(sched, gamma, expected):
    d = create_diffusion(noise_schedule=sched, p2_gamma=gamma, p2_k=1.0)
    assert d.loss_weight.mean() == pytest.approx(expected, abs=0.006)


def test_weightings_by_hand():
    snr = np.array([1e-3, 0.5, 1.0, 4.0, 100.0])
    assert np.allclose(P2Weighting(0.0, 1.0)(snr), 1.0)
    assert np.allclose(P2Weighting(0.5, 2.0)(snr), 1 / np.sqrt(2.0 + snr))
    assert np.allclose(MinSNRWeighting(5.0)(snr), [1, 1, 1, 1, 0.05])


@pytest.mark.parametrize("kw,msg", [(dict(p2_gamma=-1), "p2_gamma"), (dict(p2_k=-0.1), "p2_k"),
                                    (dict(p2_gamma=1.0, p2_k=0.0), "p2_k must be > 0"),
                                    (dict(weighting="min_snr", min_snr_gamma=0), "min_snr_gamma"),
                                    (dict(weighting="foo"), "unknown weighting")])
def test_weighting_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_weighting(**kw)


def test_p2_k_zero_allowed_for_baseline():
    assert np.allclose(make_weighting("p2", 0.0, 0.0)(np.array([0.1, 1.0])), 1.0)


def test_q_sample_closed_form():
    d = create_diffusion()
    x0 = torch.full((2, 1, 2, 2), 0.5)
    eps = torch.full((2, 1, 2, 2), -1.0)
    t = torch.tensor([0, 999])
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    xt = d.q_sample(x0, t, eps)
    for i, ti in enumerate([0, 999]):
        want = math.sqrt(ab[ti]) * 0.5 - math.sqrt(1 - ab[ti])
        assert torch.allclose(xt[i], torch.tensor(want, dtype=torch.float32), rtol=1e-5)


def test_posterior_by_hand():
    T = 40
    d = create_diffusion(steps=T)
    b = np.linspace(1e-4 * 25, 0.02 * 25, T)
    ab = np.cumprod(1 - b)
    t = 5
    x0, xt = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), -0.2)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, torch.tensor([t]))
    c1 = b[t] * math.sqrt(ab[t - 1]) / (1 - ab[t])
    c2 = (1 - ab[t - 1]) * math.sqrt(1 - b[t]) / (1 - ab[t])
    v = b[t] * (1 - ab[t - 1]) / (1 - ab[t])
    assert mean.item() == pytest.approx(c1 * 0.3 + c2 * -0.2, rel=1e-5)
    assert var.item() == pytest.approx(v, rel=1e-5)
    assert logvar.item() == pytest.approx(math.log(v), rel=1e-5)
    # at t = 0 the log-variance is clipped to t = 1's
    _, _, lv0 = d.q_posterior_mean_variance(x0, xt, torch.tensor([0]))
    assert lv0.item() == pytest.approx(math.log(b[1] * (1 - ab[0]) / (1 - ab[1])), rel=1e-5)


class ConstModel:
    """Returns a fixed output; records the timesteps it was called with."""

    def __init__(self, out):
        self.out, self.seen = out, []

    def __call__(self, x, t):
        self.seen.append(t.clone())
        return self.out.expand(x.shape[0], *self.out.shape[1:]).clone()


@pytest.mark.parametrize("sched", ["linear", "cosine"])
@pytest.mark.parametrize("gamma,k", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0, 5.0), (2.0, 0.3)])
def test_training_mse_is_p2_weighted_eps_error(sched, gamma, k):
    d = create_diffusion(noise_schedule=sched, p2_gamma=gamma, p2_k=k)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    c = 0.25
    terms = d.training_losses(ConstModel(torch.full((1, 3, 4, 4), c)), x0, t, noise=noise)
    T = 1000
    b = get_named_beta_schedule(sched, T)
    ab = np.cumprod(1 - b)
    snr = ab / (1 - ab)
    for i, ti in enumerate(t.tolist()):
        w = (k + snr[ti]) ** -gamma
        want = w * ((noise[i].double() - c) ** 2).mean().item()
        assert terms["mse"][i].item() == pytest.approx(want, rel=1e-4)
    assert torch.equal(terms["loss"], terms["mse"]) and "vb" not in terms


def test_vb_term_closed_forms_for_learned_range_variance():
    T = 1000
    d = create_diffusion(steps=T, learn_sigma=True)
    b = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - b)
    ab_prev = np.append(1.0, ab[:-1])
    pv = b * (1 - ab_prev) / (1 - ab)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 1.6 - 0.8
    noise = torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([1, 400, 999])

    class TrueEps:
        def __init__(self, v):
            self.v = v

        def __call__(self, x, tt):
            return torch.cat([noise, torch.full_like(noise, self.v)], dim=1)

    # v = -1 selects the posterior variance; with the true eps the mean is exact -> KL = 0
    vb = d.training_losses(TrueEps(-1.0), x0, t, noise=noise)["vb"]
    assert torch.allclose(vb, torch.zeros(3), atol=1e-4)
    # v = +1 selects beta: KL between two Gaussians with equal means, in bits
    vb = d.training_losses(TrueEps(1.0), x0, t, noise=noise)["vb"]
    for i, ti in enumerate(t.tolist()):
        lv1, lv2 = math.log(pv[ti]), math.log(b[ti])
        want = 0.5 * (-1 + lv2 - lv1 + math.exp(lv1 - lv2)) / math.log(2)
        assert vb[i].item() == pytest.approx(want, rel=1e-3, abs=1e-6)
    # rescale_learned_sigmas multiplies vb by T/1000
    d2 = create_diffusion(steps=T, learn_sigma=True, rescale_learned_sigmas=True, timestep_respacing="")
    vb2 = d2.training_losses(TrueEps(1.0), x0, t, noise=noise)["vb"]
    assert torch.allclose(vb2, vb * (T / 1000.0))
    d4 = create_diffusion(steps=4000, learn_sigma=True, rescale_learned_sigmas=True)
    d4b = create_diffusion(steps=4000, learn_sigma=True)
    l4 = d4.training_losses(TrueEps(1.0), x0, t, noise=noise)["vb"]
    l4b = d4b.training_losses(TrueEps(1.0), x0, t, noise=noise)["vb"]
    assert torch.allclose(l4, 4 * l4b)


def test_decoder_nll_at_t0_by_hand():
    T = 1000
    d = create_diffusion(steps=T, learn_sigma=True)
    b = np.linspace(1e-4, 0.02, T)
    x0 = torch.tensor([-1.0, -0.5, 0.2, 1.0]).view(1, 1, 2, 2)
    noise = torch.zeros_like(x0)
    out = torch.cat([noise, torch.full_like(x0, 1.0)], dim=1)  # variance = beta_0
    vb = d.training_losses(lambda x, tt: out, x0, torch.tensor([0]), noise=noise)["vb"]
    # mean at t=0 = posterior coef2 * x_t + coef1 * x0_pred, and x0_pred = x0 exactly -> mean = x0 (coef1+coef2 = 1 at t=0)
    s = math.sqrt(b[0])
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    nll = []
    for x in x0.flatten().tolist():
        if x < -0.999:
            p = Phi((1 / 255) / s)
        elif x > 0.999:
            p = 1 - Phi((-1 / 255) / s)
        else:
            p = Phi((1 / 255) / s) - Phi((-1 / 255) / s)
        nll.append(-math.log(p))
    want = np.mean(nll) / math.log(2)
    assert vb.item() == pytest.approx(want, rel=2e-3)  # ADM's tanh CDF approximation differs from erf by <1e-3


def test_p_mean_variance_fixed_large_and_small():
    T = 1000
    b = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - b)
    ab_prev = np.append(1.0, ab[:-1])
    pv = b * (1 - ab_prev) / (1 - ab)
    x = torch.full((2, 1, 1, 1), 0.1)
    t = torch.tensor([0, 300])
    m = ConstModel(torch.zeros(1, 1, 1, 1))
    large = create_diffusion(steps=T).p_mean_variance(m, x, t)
    assert large["variance"][0].item() == pytest.approx(pv[1], rel=1e-5)
    assert large["variance"][1].item() == pytest.approx(b[300], rel=1e-5)
    small = create_diffusion(steps=T, sigma_small=True).p_mean_variance(m, x, t)
    assert small["variance"][1].item() == pytest.approx(pv[300], rel=1e-5)
    # eps = 0 -> x0_pred = x / sqrt(alpha_bar), clipped to [-1, 1]
    want = min(0.1 / math.sqrt(ab[300]), 1.0)
    assert large["pred_xstart"][1].item() == pytest.approx(want, rel=1e-5)


def test_predict_xstart_mode_uses_output_directly():
    d = create_diffusion(predict_xstart=True, p2_gamma=1.0)
    x0 = torch.full((1, 1, 2, 2), 0.4)
    t = torch.tensor([100])
    terms = d.training_losses(ConstModel(torch.full((1, 1, 2, 2), 0.4)), x0, t)
    assert terms["mse"].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("spec", ["", "50", "ddim25", "10,15,20"])
@pytest.mark.parametrize("sched", ["linear", "cosine"])
def test_ddim_eta0_with_true_eps_is_exact(spec, sched):
    """x_t = sqrt(ab) x0 + sqrt(1-ab) eps and a model that returns eps -> the DDIM step gives
    sqrt(ab_prev) x0 + sqrt(1-ab_prev) eps exactly, with ab read at the original (kept) timesteps."""
    d = create_diffusion(noise_schedule=sched, timestep_respacing=spec)
    full = create_diffusion(noise_schedule=sched)
    kept = sorted(space_timesteps(1000, spec)) if spec else list(range(1000))
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(1, 1, 3, 3, generator=g) * 1.8 - 0.9
    eps = torch.randn(1, 1, 3, 3, generator=g)
    for i in [len(kept) - 2, len(kept) // 2, 1]:
        orig = kept[i]
        ab, ab_prev = full.alphas_cumprod[orig], full.alphas_cumprod[kept[i - 1]]
        xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        model = ConstModel(eps)
        out = d.ddim_sample(model, xt, torch.tensor([i]), clip_denoised=False)["sample"]
        want = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        assert torch.allclose(out, want, rtol=1e-4, atol=1e-5)
        assert model.seen[-1].item() == orig  # the network sees the original timestep index


def test_p_sample_no_noise_at_t0_and_mean_plus_sigma_noise():
    d = create_diffusion(steps=100)
    x = torch.full((2, 1, 1, 1), 0.2)
    z = torch.ones_like(x)
    m = ConstModel(torch.zeros(1, 1, 1, 1))
    out = d.p_sample(m, x, torch.tensor([0, 50]), noise=z)
    pmv = d.p_mean_variance(m, x, torch.tensor([0, 50]))
    assert out["sample"][0].item() == pytest.approx(pmv["mean"][0].item())
    assert out["sample"][1].item() == pytest.approx(pmv["mean"][1].item() + math.sqrt(d.betas[50]), rel=1e-5)


def test_space_timesteps_by_hand():
    assert space_timesteps(10, "2,3") == {0, 4, 5, 7, 9}
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    s = space_timesteps(1000, "250")
    assert len(s) == 250 and 0 in s and 999 in s
    s = space_timesteps(300, "10,15,20")
    assert len(s) == 45 and min(s) == 0 and max(s) == 299
    assert len([x for x in s if x < 100]) == 10 and len([x for x in s if 100 <= x < 200]) == 15
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim37")  # no integer stride gives exactly 37
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


@pytest.mark.parametrize("spec,n", [("250", 250), ("ddim25", 25), ("10,15,20", 45)])
def test_respaced_process_keeps_alpha_bar(spec, n):
    full = create_diffusion(noise_schedule="cosine", p2_gamma=1.0)
    sp = create_diffusion(noise_schedule="cosine", timestep_respacing=spec, p2_gamma=1.0)
    kept = sorted(space_timesteps(1000, spec))
    assert sp.num_timesteps == n and list(sp.timestep_map) == kept
    assert np.allclose(sp.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)
    assert np.allclose(sp.snr, full.snr[kept], rtol=1e-9)
    assert np.allclose(sp.loss_weight, full.loss_weight[kept], rtol=1e-9)


def test_min_snr_through_factory():
    d = create_diffusion(weighting="min_snr", min_snr_gamma=5.0)
    assert np.allclose(d.loss_weight, np.minimum(d.snr, 5.0) / d.snr)


def test_sample_loop_shape_and_range():
    d = create_diffusion(timestep_respacing="ddim5")
    out = d.sample_loop(ConstModel(torch.zeros(1, 1, 4, 4)), (2, 1, 4, 4), ddim=True,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 4, 4) and torch.isfinite(out).all()


def test_diffusion_from_config_matches_create_diffusion_and_specs():
    from p2core.config import DiffusionConfig
    from p2core.diffusion import diffusion_from_config
    from p2core.sampling import diffusion_for_spec

    cfg = DiffusionConfig(diffusion_steps=200, noise_schedule="cosine", learn_sigma=True, sigma_small=False,
                          rescale_learned_sigmas=True, timestep_respacing="50", weighting="p2", p2_gamma=0.5, p2_k=2.0)
    d = diffusion_from_config(cfg)
    ref = create_diffusion(steps=200, noise_schedule="cosine", learn_sigma=True, rescale_learned_sigmas=True,
                           timestep_respacing="50", p2_gamma=0.5, p2_k=2.0)
    assert d.num_timesteps == 50 and np.array_equal(d.betas, ref.betas)
    assert np.array_equal(d.timestep_map, ref.timestep_map) and np.array_equal(d.loss_weight, ref.loss_weight)
    assert d.learn_sigma and d.rescale_learned_sigmas and d.original_num_steps == 200
    assert diffusion_from_config(cfg, "").num_timesteps == 200  # "" = every step, not the config's respacing
    dd = diffusion_from_config(cfg, "ddim10")
    assert dd.num_timesteps == 10 and np.array_equal(dd.betas, diffusion_for_spec(cfg, "ddim10").betas)
    ms = diffusion_from_config(DiffusionConfig(weighting="min_snr", min_snr_gamma=3.0))
    assert np.allclose(ms.loss_weight, create_diffusion(weighting="min_snr", min_snr_gamma=3.0).loss_weight)
