"""Gaussian diffusion with P2 / Min-SNR weighting, learned-range variance and respacing.

Numbers follow the official P2 code (jychoi118/P2-weighting, a guided-diffusion fork): coefficients are float64
numpy arrays of shape [T], gathered at t and cast to float32 before they touch a tensor. Images are [N, C, H, W]
in [-1, 1]; t is a LongTensor [N] of indices into this (possibly respaced) process. `model(x, t)` may be any
callable; for a respaced process it receives the original timestep indices.
"""
from __future__ import annotations

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import space_timesteps
from .schedules import alphas_cumprod_from_betas, get_named_beta_schedule, snr_from_alphas_cumprod
from .weighting import make_weighting

__all__ = ["GaussianDiffusion", "create_diffusion", "diffusion_from_config", "space_timesteps"]


def _extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
    """arr[t] as float32, broadcast to `shape` ([N] -> [N, 1, 1, 1])."""
    res = torch.from_numpy(arr).to(device=t.device)[t].float()
    return res.view(-1, *([1] * (len(shape) - 1))).expand(shape)


class GaussianDiffusion:
    """A diffusion process over `betas` ([T] float64).

    learn_sigma: the model outputs 2C channels, the second half interpolating log-variance between the posterior
    variance and beta (ADM's LEARNED_RANGE); otherwise the variance is fixed (beta, or the posterior's if sigma_small).
    predict_xstart: the model predicts x_0 instead of epsilon.
    timestep_map: for a respaced process, the original index of each kept step.
    """

    def __init__(self, betas, *, learn_sigma=False, sigma_small=False, predict_xstart=False,
                 rescale_learned_sigmas=False, weighting=None, timestep_map=None, original_num_steps=None,
                 rescale_timesteps=False):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.predict_xstart = predict_xstart
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.rescale_timesteps = rescale_timesteps
        self.weighting = weighting if weighting is not None else make_weighting("p2", 0.0, 1.0)
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else np.arange(self.num_timesteps))
        self.original_num_steps = original_num_steps or self.num_timesteps

        alphas = 1.0 - betas
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0, so its log is clipped to the value at t=1.
        pv1 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.snr = snr_from_alphas_cumprod(self.alphas_cumprod)
        self.loss_weight = self.weighting(self.snr)
        large = np.append(pv1, betas[1:])
        self._fixed_large = (large, np.log(large))
        self._log_betas = np.log(betas)

    # -- the forward process -------------------------------------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(a_bar) x_0, (1 - a_bar) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t.shape),
                _extract(self.posterior_log_variance_clipped, t, x_t.shape))

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def _model_t(self, t):
        """The timestep the network sees: the original index (respacing), optionally scaled to [0, 1000)."""
        mapped = torch.as_tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    # -- the reverse process -------------------------------------------------------------------------------
    def p_mean_variance(self, model, x, t, clip_denoised=True, model_output=None):
        """p(x_{t-1} | x_t): dict mean, variance, log_variance, pred_xstart (each [N, C, H, W])."""
        if model_output is None:
            model_output = model(x, self._model_t(t))
        C = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learn_sigma needs a model with {2 * C} output channels, got {model_output.shape[1]}")
            model_output, var_values = torch.split(model_output, C, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(self._log_betas, t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            var, logvar = (self.posterior_variance, self.posterior_log_variance_clipped) if self.sigma_small \
                else self._fixed_large
            variance, log_variance = _extract(var, t, x.shape), _extract(logvar, t, x.shape)
        if self.predict_xstart:
            pred_xstart = model_output
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model, x, t, clip_denoised=True, noise=None):
        """One ancestral step x_t -> x_{t-1}: dict sample, pred_xstart. No noise is added at t == 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, eta=0.0, noise=None):
        """One DDIM step x_t -> x_{t-1} (eta = 0: deterministic): dict sample, pred_xstart."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        a_bar = _extract(self.alphas_cumprod, t, x.shape)
        a_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(a_bar_prev) + torch.sqrt(1 - a_bar_prev - sigma ** 2) * eps
        if noise is None:
            noise = torch.randn_like(x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def sample_loop(self, model, shape, *, ddim=False, eta=0.0, clip_denoised=True, noise=None, generator=None,
                    device="cpu", progress=False):
        """Run the whole reverse process from x_T ~ N(0, I) to x_0: returns [N, C, H, W] in [-1, 1]."""
        img = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            z = torch.randn(*shape, generator=generator, device=img.device)
            if ddim:
                img = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, eta=eta, noise=z)["sample"]
            else:
                img = self.p_sample(model, img, t, clip_denoised=clip_denoised, noise=z)["sample"]
        return img

    # -- training ------------------------------------------------------------------------------------------
    def sample_timesteps(self, n, device="cpu", generator=None):
        """Uniform timesteps t ~ U{0..T-1}, LongTensor [n]."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """The variational bound term in bits per dim, [N]: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=False, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"])) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / np.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, noise=None):
        """Per-sample losses, dict of [N] tensors: mse (weighted), vb (learned variance only) and loss."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, self._model_t(t))
        terms = {}
        C = x_t.shape[1]
        if self.learn_sigma:
            model_output, var_values = torch.split(model_output, C, dim=1)
            # The vb term trains only the variance: the mean it sees is frozen.
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.rescale_learned_sigmas:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.predict_xstart else noise
        weight = _extract(self.loss_weight, t, target.shape)
        terms["mse"] = mean_flat(weight * (target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def create_diffusion(steps=1000, noise_schedule="linear", learn_sigma=False, sigma_small=False, predict_xstart=False,
                     rescale_learned_sigmas=False, timestep_respacing="", p2_gamma=0.0, p2_k=1.0,
                     weighting="p2", min_snr_gamma=5.0, rescale_timesteps=False) -> GaussianDiffusion:
    """The official `create_gaussian_diffusion` with P2 (default) or Min-SNR weighting.

    timestep_respacing: "" (all T steps), "250", "10,15,20" or "ddim25"; the respaced process keeps the kept
    steps' alpha_bar and recomputes betas from them, as the official SpacedDiffusion does.
    """
    betas = get_named_beta_schedule(noise_schedule, int(steps))
    w = make_weighting(weighting, p2_gamma, p2_k, min_snr_gamma)
    kwargs = dict(learn_sigma=learn_sigma, sigma_small=sigma_small, predict_xstart=predict_xstart,
                  rescale_learned_sigmas=rescale_learned_sigmas, weighting=w, rescale_timesteps=rescale_timesteps,
                  original_num_steps=len(betas))
    if not timestep_respacing:
        return GaussianDiffusion(betas, **kwargs)
    keep = space_timesteps(len(betas), timestep_respacing)
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    last, new_betas, tmap = 1.0, [], []
    for i, ac in enumerate(alphas_cumprod):
        if i in keep:
            new_betas.append(1 - ac / last)
            last = ac
            tmap.append(i)
    return GaussianDiffusion(np.array(new_betas), timestep_map=tmap, **kwargs)


def diffusion_from_config(diff_cfg, timestep_respacing: str | None = None) -> GaussianDiffusion:
    """The process of a DiffusionConfig; timestep_respacing None = the config's own (training) respacing, else a
    sampling spec such as "250" or "ddim25" (already normalised by `respace.parse_respacing`)."""
    d = diff_cfg
    respacing = d.timestep_respacing if timestep_respacing is None else timestep_respacing
    return create_diffusion(steps=d.diffusion_steps, noise_schedule=d.noise_schedule, learn_sigma=d.learn_sigma,
                            sigma_small=d.sigma_small, predict_xstart=d.predict_xstart,
                            rescale_learned_sigmas=d.rescale_learned_sigmas, rescale_timesteps=d.rescale_timesteps,
                            timestep_respacing=respacing, p2_gamma=d.p2_gamma, p2_k=d.p2_k, weighting=d.weighting,
                            min_snr_gamma=d.min_snr_gamma)
