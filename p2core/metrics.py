"""One naming scheme for evaluation metrics everywhere: `{metric}{n}_{steps}`.

metric: fid | kid (Inception features) or rfid | rkid (the cheap random test network); n: number of generated
images (10000 -> "10k", 512 -> "512"); steps: the sampling spec ("250" DDPM respaced to 250, "ddim25" DDIM;
section counts "10,15,20" are written "10-15-20" since MLflow refuses commas in metric names).

A metric of an EMA reconstructed post hoc (`eval.ema_sigma_rels`, a power-function EMA) carries its sigma_rel as a
suffix: `kid1k_ddim25_ema0.10` (`with_ema`, `split_ema`); the bare name is the tracked profile's. With
`eval.ema_choose_on`, `kid1k_ddim25_emachosen` is the metric of the EMA that the cheap metric ranked first at that
point (`CHOSEN`; its sigma_rel is the record's `ema_chosen`).
"""
from __future__ import annotations

import re

_NAME = re.compile(r"^(fid|kid|rfid|rkid)(\d+k?)_([a-z0-9-]+)$")


def count_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def steps_label(spec: str) -> str:
    """A sampling spec as metric names and result keys write it: "10,15,20" -> "10-15-20" (MLflow refuses commas)."""
    return str(spec).replace(",", "-")


def steps_from_label(label: str) -> str:
    """The sampling spec a label names: "10-15-20" -> "10,15,20" (the inverse of `steps_label`)."""
    return str(label).replace("-", ",")


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
    return kind, count, steps_from_label(steps)


def canonical_metric_name(name: str) -> str:
    """The name the evaluator writes for the same metric: "kid1000_ddim25" -> "kid1k_ddim25", "fid10000_50" ->
    "fid10k_50" (so a config or sweep may spell the count either way)."""
    from .respace import parse_respacing

    kind, n, steps = parse_metric_name(name)
    return f"{kind}{count_label(n)}_{steps_label(parse_respacing(steps))}"


_EMA = re.compile(r"^(.+)_ema(\d+\.\d+|chosen)$")

CHOSEN = "chosen"  # the EMA `eval.ema_choose_on` ranked first at a point, as metric names and tables name it


def ema_label(sigma_rel: float | str) -> str:
    """A sigma_rel as metric names write it, at least two decimals: 0.1 -> "ema0.10", 0.075 -> "ema0.075";
    `CHOSEN` -> "emachosen"."""
    if sigma_rel == CHOSEN:
        return f"ema{CHOSEN}"
    txt = f"{float(sigma_rel):.4f}".rstrip("0")
    whole, frac = txt.split(".")
    return f"ema{whole}.{frac.ljust(2, '0')}"


TRACKED = "tracked"  # the EMA a run evaluates during training, as tables and EMA candidates name it


def ema_name(sigma_rel: float | str | None) -> str:
    """How tables, reports and EMA candidates name an EMA: "tracked" (None), "chosen" (`CHOSEN`), else its
    sigma_rel ("0.07")."""
    return TRACKED if sigma_rel is None else CHOSEN if sigma_rel == CHOSEN else f"{float(sigma_rel):g}"


def with_ema(name: str, sigma_rel: float | str) -> str:
    """`name` (a metric or another result key) for the EMA of `sigma_rel`: "kid1k_ddim25" -> "kid1k_ddim25_ema0.10"."""
    return f"{name}_{ema_label(sigma_rel)}"


def split_ema(name: str) -> tuple[str, float | str | None]:
    """("kid1k_ddim25", 0.1) for "kid1k_ddim25_ema0.10", ("kid1k_ddim25", CHOSEN) for "kid1k_ddim25_emachosen";
    (name, None) for a name without an EMA suffix."""
    m = _EMA.match(name or "")
    if not m:
        return name, None
    return m.group(1), CHOSEN if m.group(2) == CHOSEN else float(m.group(2))


def is_metric_name(name: str) -> bool:
    return bool(_NAME.match(name or ""))


def same_metric(a: str, b: str) -> bool:
    """`a` and `b` name the same metric, in either spelling of the count ("kid1000_ddim25" and "kid1k_ddim25")."""
    return a == b or (is_metric_name(a) and is_metric_name(b) and canonical_metric_name(a) == canonical_metric_name(b))


def same_family(name: str, metric: str) -> bool:
    """`name` (any result key) is a metric of `metric`'s family: the same kind and sample count, at any sampling
    spec and of any EMA ("kid1k_250", "kid1k_ddim10" and "kid1k_ddim10_ema0.07"; not "fid1k_250" nor "kid512_250").
    `metric` must be a metric name."""
    base = split_ema(name)[0]
    return is_metric_name(base) and parse_metric_name(base)[:2] == parse_metric_name(metric)[:2]


def family_of(names, metric: str) -> list[str]:
    """The metrics of `metric`'s family among `names` (one per sampling spec and EMA), `metric` first, then by
    name."""
    return sorted({n for n in names if same_family(n, metric)}, key=lambda k: (k != metric, k))


def metrics_at(points, point_metrics: dict, final: bool = False) -> tuple[list, bool]:
    """(own, tracked): what one evaluation answering the evaluation points `points` (images) computes. `own`: each
    point's own metrics (`point_metrics`: point -> [names], a low ASHA rung's cheaper metric); `tracked`: whether the
    tracked metric is computed too (at the end, with no points, or when a point has no own metric)."""
    own = [m for p in points for m in point_metrics.get(p, [])]
    return own, final or not points or any(p not in point_metrics for p in points)


def judged_on(points, point_metrics: dict, metric: str) -> str:
    """The metric that judges an evaluation answering `points`: the own metric of the highest point that has one
    (a low ASHA rung), else the tracked `metric` (`metrics_at` computes it there)."""
    low = [p for p in points if p in point_metrics]
    return point_metrics[max(low)][0] if low else metric


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
