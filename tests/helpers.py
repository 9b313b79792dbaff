from p2core.config import config_from_dict


def tiny_cfg(**sections):
    """A seconds-long config: synthetic 16 px images, a tiny UNet, learned sigma, evaluation off."""
    d = {
        "model": {"image_size": 16, "in_channels": 1, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                  "attention_resolutions": "8", "num_head_channels": 32},
        "diffusion": {"diffusion_steps": 100, "learn_sigma": True, "p2_gamma": 1.0, "rescale_learned_sigmas": True},
        "data": {"dataset": "synthetic", "max_images": 64},
        "train": {"total_images": 256, "batch_size": 16, "lr": 1e-3, "ema_rate": 0.9, "log_every_images": 32,
                  "checkpoint_every_images": 128, "num_threads": 1, "grid_samples": 0, "seed": 0,
                  "bf16": False},  # a toy UNet is overhead-bound: bf16 autocast costs more than it saves
        "eval": {"enabled": False, "num_samples": 16, "sampling_steps": ["ddim5"], "extractor": "random",
                 "ref_samples": 32, "batch_size": 16},
    }
    for sec, vals in sections.items():
        if isinstance(vals, dict):
            d.setdefault(sec, {}).update(vals)
        else:
            d[sec] = vals
    return config_from_dict(d)
