"""ADM UNet (guided-diffusion / P2), with the official module and parameter names.

Module tree (identical to the official `UNetModel`, so an official state_dict loads with strict=True as it is):
  time_embed.{0,2}                      Linear(C, 4C), SiLU, Linear(4C, 4C)
  label_emb                             Embedding(NUM_CLASSES, 4C), only with class_cond
  input_blocks.N.M                      conv_in, then ResBlock / AttentionBlock / Downsample per level
  middle_block.{0,1,2}                  ResBlock, AttentionBlock, ResBlock
  output_blocks.N.M                     ResBlock (on concatenated skip), AttentionBlock, Upsample
  out.{0,2}                             GroupNorm(32), SiLU, Conv2d(ch, out_channels, 3)
ResBlock: in_layers.{0: GroupNorm, 2: Conv2d}, emb_layers.1 (Linear), out_layers.{0: GroupNorm, 3: Conv2d},
  skip_connection (Conv2d 1x1 when channels change). AttentionBlock: norm (GroupNorm), qkv (Conv1d C->3C, k=1),
  proj_out (Conv1d C->C, k=1). The qkv channel layout is the official one: with use_new_attention_order=False
  ("legacy") channels are grouped per head as [q_h, k_h, v_h] (each head_dim wide) for h = 0..H-1; with True they are
  [q (all heads), k (all heads), v (all heads)]. Attention itself runs through scaled_dot_product_attention.

Shapes: forward(x [N, in_channels, H, W], timesteps [N] (int or float), y [N] or None) -> [N, out_channels, H, W],
out_channels = in_channels * (2 if learn_sigma else 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import parse_attention_resolutions, parse_channel_mult

NUM_CLASSES = 1000


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N] -> [N, dim]: [cos(t f), sin(t f)] with f = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def normalization(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.detach().zero_()
    return m


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention. Parameters as the official block (qkv / proj_out are 1x1 Conv1d)."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.new_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        b, c, *spatial = x.shape
        L = math.prod(spatial)
        h = self.norm(x).reshape(b, c, L).transpose(1, 2)  # [B, L, C]
        qkv = F.linear(h, self.qkv.weight.squeeze(-1), self.qkv.bias)  # [B, L, 3C]
        H, d = self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = qkv.view(b, L, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = qkv.view(b, L, H, 3, d).permute(3, 0, 2, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, d]; scale 1/sqrt(d) as the official
        a = a.transpose(1, 2).reshape(b, L, c)  # head-major channels, as the official reshape
        out = F.linear(a, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_classes=None, use_checkpoint=False,
                 num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, use_new_attention_order=False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, dropout, out_channels=ch_out, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)))

    def forward(self, x, timesteps, y=None):
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y exactly when the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def create_model(image_size, num_channels, num_res_blocks, channel_mult="", learn_sigma=False,
                 attention_resolutions="16", num_heads=1, num_head_channels=-1, use_scale_shift_norm=True,
                 dropout=0.0, resblock_updown=False, in_channels=3, class_cond=False, num_heads_upsample=-1,
                 use_checkpoint=False, use_fp16=False, use_new_attention_order=False, **unknown) -> UNetModel:
    """The official `create_model` flags -> UNetModel.

    use_fp16 is accepted for compatibility; p2sweep trains in fp32 weights with bf16 autocast on GPU instead of
    converting the network to fp16 (same parameters, same state_dict).
    """
    if unknown:
        raise TypeError(f"create_model: unknown argument(s) {', '.join(sorted(unknown))}")
    mult = parse_channel_mult(channel_mult, image_size)
    attn_ds = parse_attention_resolutions(attention_resolutions, image_size)
    return UNetModel(image_size=image_size, in_channels=in_channels, model_channels=num_channels,
                     out_channels=in_channels * (2 if learn_sigma else 1), num_res_blocks=num_res_blocks,
                     attention_resolutions=attn_ds, dropout=dropout, channel_mult=mult,
                     num_classes=NUM_CLASSES if class_cond else None, use_checkpoint=use_checkpoint,
                     num_heads=num_heads, num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                     use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                     use_new_attention_order=use_new_attention_order)


def model_from_config(cfg) -> UNetModel:
    """Build the UNet of a TrainingConfig (learn_sigma comes from the diffusion section, as in the official flags)."""
    m = cfg.model
    return create_model(m.image_size, m.num_channels, m.num_res_blocks, channel_mult=m.channel_mult,
                        learn_sigma=cfg.diffusion.learn_sigma, attention_resolutions=m.attention_resolutions,
                        num_heads=m.num_heads, num_head_channels=m.num_head_channels,
                        use_scale_shift_norm=m.use_scale_shift_norm, dropout=m.dropout,
                        resblock_updown=m.resblock_updown, in_channels=m.in_channels,
                        num_heads_upsample=m.num_heads_upsample, use_new_attention_order=m.use_new_attention_order)


# -- official checkpoints -------------------------------------------------------------------------------------

def convert_official_state_dict(sd: dict) -> dict:
    """Official (guided-diffusion / P2) state_dict -> p2sweep's. The module tree and qkv layout are the official ones
    (see the module docstring), so only wrappers are undone: a `module.` prefix (DataParallel/DDP) is stripped and
    tensors are made float32 (official fp16 checkpoints store the same names)."""
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.float() if torch.is_tensor(v) and v.is_floating_point() else v
    return out


def to_official_state_dict(sd: dict) -> dict:
    """p2sweep state_dict -> one the official `UNetModel.load_state_dict` accepts (names already match)."""
    return {k: v.detach().clone() for k, v in sd.items()}


def load_weights(model: nn.Module, sd: dict, source: str = "checkpoint") -> None:
    """Load an official or p2sweep state_dict strictly; a missing, extra or mis-shaped tensor raises a UserError
    naming the first one (and both shapes)."""
    from .errors import UserError

    sd = convert_official_state_dict(sd)
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise UserError(f"{source}: tensor {k!r} missing from the checkpoint (model flags do not fit it)")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)} in the checkpoint, "
                            f"{tuple(v.shape)} in the model built from the flags")
    extra = [k for k in sd if k not in own]
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r} in the checkpoint (model flags do not fit it)")
    model.load_state_dict(sd, strict=True)
