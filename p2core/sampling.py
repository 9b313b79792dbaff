"""Generate images from a trained network for a sampling spec ("250" = DDPM respaced, "ddim25" = DDIM)."""
from __future__ import annotations


import torch

from . import accel
from .atomic import atomic_write
from .data import to_uint8
from .diffusion import diffusion_from_config
from .respace import parse_respacing


def diffusion_for_spec(diff_cfg, spec: str):
    """The respaced process of a DiffusionConfig for one sampling spec."""
    return diffusion_from_config(diff_cfg, parse_respacing(spec))


@torch.inference_mode()
def generate(model, diff_cfg, spec: str, num_samples: int, *, image_size: int, channels: int, batch_size: int = 256,
             seed: int = 0, device=None, bf16=accel.AUTO, progress: bool = False, eta: float = 0.0):
    """Sample `num_samples` images: uint8 tensor [N, C, H, W] on the CPU, deterministic in (seed, batch_size)."""
    device = torch.device(device or next(model.parameters()).device)
    diffusion = diffusion_for_spec(diff_cfg, spec)
    ddim = parse_respacing(spec).startswith("ddim")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    bf16 = accel.use_bf16(bf16, device)
    was_training = model.training
    model.eval()

    def net(x, t):
        with accel.autocast(device, bf16):
            return model(x, t).float()

    out = []
    from tqdm.auto import tqdm

    bar = tqdm(total=num_samples, desc=f"sampling {spec}", unit="img", disable=not progress, leave=False)
    try:
        done = 0
        while done < num_samples:
            n = min(batch_size, num_samples - done)
            x = diffusion.sample_loop(net, (n, channels, image_size, image_size), ddim=ddim, eta=eta,
                                      generator=gen, device=device)
            out.append(to_uint8(x).cpu())
            done += n
            bar.update(n)
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out)


def save_grid(images_uint8: torch.Tensor, path: str, nrow: int | None = None) -> str:
    """Write uint8 [N, C, H, W] as one PNG grid, atomically."""
    import math

    import numpy as np
    from PIL import Image

    n, c, h, w = images_uint8.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    pad = 2
    grid = np.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    arr = images_uint8.numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    return atomic_write(path, lambda f: img.save(f, format="PNG"))
