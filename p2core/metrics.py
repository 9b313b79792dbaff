"""One naming scheme for evaluation metrics everywhere: `{metric}{n}_{steps}`.

metric: fid | kid (Inception features) or rfid | rkid (the cheap random test network); n: number of generated
images (10000 -> "10k", 512 -> "512"); steps: the sampling spec ("250" DDPM respaced to 250, "ddim25" DDIM;
section counts "10,15,20" are written "10-15-20" since MLflow refuses commas in metric names).
"""
from __future__ import annotations

import re

_NAME = re.compile(r"^(fid|kid|rfid|rkid)(\d+k?)_([a-z0-9-]+)$")


def count_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def steps_label(spec: str) -> str:
    return str(spec).replace(",", "-")


def metric_name(kind: str, n: int, spec: str, extractor: str = "inception") -> str:
    prefix = "r" if extractor == "random" else ""
    return f"{prefix}{kind}{count_label(n)}_{steps_label(spec)}"


def parse_metric_name(name: str) -> tuple[str, int, str]:
    """"fid10k_250" -> ("fid", 10000, "250"); raises ValueError on anything else."""
    m = _NAME.match(name or "")
    if not m:
        raise ValueError(f"bad metric name {name!r}: expected {{fid|kid|rfid|rkid}}{{n}}_{{steps}}, e.g. fid10k_250 or kid512_ddim25")
    kind, n, steps = m.groups()
    count = int(n[:-1]) * 1000 if n.endswith("k") else int(n)
    return kind, count, steps.replace("-", ",")


def canonical_metric_name(name: str) -> str:
    """The name the evaluator writes for the same metric: "kid1000_ddim25" -> "kid1k_ddim25", "fid10000_50" ->
    "fid10k_50" (so a config or sweep may spell the count either way)."""
    from .respace import parse_respacing

    kind, n, steps = parse_metric_name(name)
    return f"{kind}{count_label(n)}_{steps_label(parse_respacing(steps))}"


def is_metric_name(name: str) -> bool:
    return bool(_NAME.match(name or ""))


def check_metric_produced(name: str, cfg) -> str:
    """Raise ValueError unless the config's evaluation produces `name`; return the sampling spec it needs."""
    from .respace import parse_respacing

    kind, n, steps = parse_metric_name(name)
    ev = cfg.eval
    base = kind[1:] if kind.startswith("r") else kind
    if kind.startswith("r") != (ev.extractor == "random"):
        want = "random" if kind.startswith("r") else "inception"
        raise ValueError(f"{name} needs eval.extractor: {want} (the config has {ev.extractor})")
    if base not in ev.metrics:
        raise ValueError(f"{name} needs {base!r} in eval.metrics (the config has {ev.metrics})")
    if n != ev.num_samples:
        raise ValueError(f"{name} needs eval.num_samples: {n} (the config has {ev.num_samples})")
    specs = [parse_respacing(s) for s in ev.sampling_steps]
    if parse_respacing(steps) not in specs:
        raise ValueError(f"{name} needs {steps!r} in eval.sampling_steps (the config has {ev.sampling_steps})")
    return parse_respacing(steps)


def check_metric_producible(name: str, cfg) -> str:
    """Raise ValueError unless the evaluator can compute `name` for this config at any point (an ASHA rung's
    cheaper metric: its own sample count and sampling spec, the config's feature extractor); return its spec."""
    from .respace import parse_respacing, space_timesteps

    kind, n, steps = parse_metric_name(name)
    if kind.startswith("r") != (cfg.eval.extractor == "random"):
        want = "random" if kind.startswith("r") else "inception"
        raise ValueError(f"{name} needs eval.extractor: {want} (the config has {cfg.eval.extractor})")
    if n < 2:
        raise ValueError(f"{name}: at least 2 samples")
    spec = parse_respacing(steps)
    space_timesteps(cfg.diffusion.diffusion_steps, spec)
    return spec
