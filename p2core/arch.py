"""Torch-free parsing of the official UNet string flags (so config validation stays fast)."""


def parse_channel_mult(channel_mult: str, image_size: int) -> tuple:
    """"" -> the official per-resolution default; "1,2,2" -> (1, 2, 2)."""
    if channel_mult in ("", None):
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                    64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
        if image_size not in defaults:
            raise ValueError(f"no default channel_mult for image_size {image_size}; set model.channel_mult, e.g. '1,2,2'")
        return defaults[image_size]
    try:
        mult = tuple(float(c) if "." in c else int(c) for c in str(channel_mult).split(","))
    except ValueError:
        raise ValueError(f"channel_mult {channel_mult!r}: expected comma-separated numbers like '1,2,2'") from None
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"channel_mult {channel_mult!r}: multipliers must be > 0")
    if image_size % (2 ** (len(mult) - 1)):
        raise ValueError(f"image_size {image_size} is not divisible by 2^{len(mult) - 1} (channel_mult {channel_mult!r})")
    return mult


def parse_attention_resolutions(attention_resolutions: str, image_size: int) -> tuple:
    """"16,8" at image_size 32 -> downsample factors (2, 4), as the official create_model computes them."""
    s = str(attention_resolutions or "").strip()
    if not s:
        return ()
    out = []
    for r in s.split(","):
        r = r.strip()
        if not r.isdigit() or int(r) < 1:
            raise ValueError(f"attention_resolutions {attention_resolutions!r}: expected resolutions like '16,8'")
        out.append(image_size // int(r))
    return tuple(out)
