"""Typed training config, loaded from YAML with validation. Field names follow the official P2/ADM flags.

A config file has the sections `model`, `diffusion`, `data`, `train`, `eval`; every key is addressable by a dotted
path (`diffusion.p2_gamma`), which is how `--set` and sweep search spaces name them. Errors raise UserError with the
file or dotted key in the message.

EMA of the weights (`train.ema`)
--------------------------------
`train.ema.type: classic` (the default) is ADM's EMA, `train.ema_rate` (and `train.ema_warmup`), unchanged: the
same weights, checkpoints and logs as before `train.ema` existed; `train.ema`'s other keys are then unused.
(guided-diffusion's comma list of classic rates, `ema_rate: "0.9999,0.999"`, is not accepted: `ema_rate` stays a
single float.)

`train.ema.type: power` replaces it by the power-function EMA of Karras et al. 2024 (p2core.phema): one profile per
`sigma_rels` entry (default [0.05, 0.10]; each in (0, 0.3), the EMA's width relative to the images seen), and a
snapshot of every profile written to `<out_dir>/ema_snapshots/snap_<images>.pt` every `snapshot_every_images`
(0 = at every checkpoint point, `train.checkpoint_every_images`, which must then be > 0), and at the end. From the
snapshots an EMA of any sigma_rel (or a classic rate) at any snapshot point is reconstructed after training
(`phema.reconstruct(phema.load_snapshots(folder), sigma_rel, at_images)`). During training, grids, the tracked
metric and the checkpoint's `ema` weights use the tracked profile with the largest sigma_rel; `eval.ema_sigma_rels`
adds, at every evaluation, the same metrics for the EMA of each listed sigma_rel, reconstructed from the snapshots
taken so far (never a later one; one is taken at the evaluation point if none is there), named
`<metric>_ema<sigma_rel>` and sampled from the same initial noise as the tracked profile (paired comparisons). Each
listed sigma_rel costs one more evaluation at every point, unless `eval.ema_choose_on` names a cheap metric (for
example the first ASHA rung's `kid1k_ddim10`): then every EMA, the tracked one included, is scored on that metric
alone (`kid1k_ddim10_ema0.05`, ...), and the point's metrics are computed once more, for the EMA that ranks first
there (`<metric>_emachosen`, its sigma_rel in `ema_chosen`; the tracked one's values when it wins), so the extra
cost is k cheap evaluations plus at most one evaluation. `train.ema_rate` and `ema_warmup` are unused.

Snapshot size: `snapshot_dtype` (float16 by default; bfloat16 or float32) times the parameter count, per profile:
2 bytes x parameters per profile in fp16, e.g. about 190 MB per fp16 snapshot per profile for the 93.6M-parameter
paper config (375 MB per snapshot file with two profiles). Choosing `snapshot_every_images`: a reconstruction at T
images uses only the snapshots taken up to T, and its accuracy grows with their number: tests/test_phema.py
measures a relative error of 7.4e-4 with 20 snapshots per profile before T and 1.1e-4 with 40 (the 0.05 and
0.10 profiles themselves differ by 0.07-0.16 there). So choose it so that the earliest point you will reconstruct
at (the first ASHA rung, the first evaluation) has at least ~20 snapshots before it: snapshot_every_images <=
that point / 20; a multiple of the batch size keeps the snapshot times on the nominal points. Disk is then the
number of snapshots x profiles x bytes per parameter x parameters. fp16 rounding adds a relative error of about
2e-4 to a reconstruction, bf16 about 1.4e-3 (same tests), float32 none.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field

import yaml

from .errors import UserError


class Switch:
    """Annotation of a setting that is true, false or "auto" (resolved per device by p2core.accel)."""


@dataclass
class ModelConfig:
    image_size: int = 32
    in_channels: int = 3
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: str = ""
    attention_resolutions: str = "16"
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    dropout: float = 0.0
    use_new_attention_order: bool = False


@dataclass
class DiffusionConfig:
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = False
    sigma_small: bool = False
    predict_xstart: bool = False
    rescale_learned_sigmas: bool = False
    rescale_timesteps: bool = False
    timestep_respacing: str = ""
    weighting: str = "p2"
    p2_gamma: float = 0.0
    p2_k: float = 1.0
    min_snr_gamma: float = 5.0


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist | folder | synthetic (tests only)
    path: str = ""  # folder of images, or the directory of the idx files ("" = Debian's location)
    random_flip: bool = True
    max_images: int = 0  # 0 = all
    cache_dir: str = ""  # decoded-image cache ("" = $P2SWEEP_CACHE or ~/.cache/p2sweep)


EMA_TYPES = ("classic", "power")
SNAPSHOT_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class EMAConfig:
    """`train.ema`: which EMA of the weights a run keeps (see the module docstring)."""
    type: str = "classic"  # classic (train.ema_rate, ADM) | power (power-function EMA, post-hoc reconstruction)
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])  # power: the tracked profiles
    snapshot_every_images: int = 0  # power: 0 = every checkpoint point (train.checkpoint_every_images)
    snapshot_dtype: str = "float16"  # float16 | bfloat16 | float32: 2, 2 or 4 bytes per parameter and profile

    def snapshot_every(self, checkpoint_every_images: int) -> int:
        """The snapshot interval in images (0 = no snapshots: a classic EMA)."""
        if self.type != "power":
            return 0
        return self.snapshot_every_images or checkpoint_every_images


@dataclass
class TrainConfig:
    total_images: int = 100_000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    ema_rate: float = 0.9999
    ema_warmup: bool = False  # rate min(ema_rate, (1+step)/(10+step)); off = ADM
    ema: EMAConfig = field(default_factory=EMAConfig)  # type: classic (the two keys above) | power
    seed: int = 0
    log_every_images: int = 2048
    eval_every_images: int = 0  # 0 = only at the end
    checkpoint_every_images: int = 10_000
    sample_every_images: int = 0  # 0 = only at the end
    grid_samples: int = 16  # images in each sample grid (0 = no grids)
    keep_checkpoints: int = 2
    num_threads: int = 0  # 0 = the CPUs this process may use
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: Switch = "auto"  # bf16 autocast; auto = CUDA, or a CPU with bf16 units (p2core/accel.py)
    compile: bool = False
    channels_last: bool = False  # measured mixed (p2core/accel.py)


@dataclass
class EvalConfig:
    enabled: bool = True
    num_samples: int = 10_000
    sampling_steps: list = field(default_factory=lambda: ["250"])
    metrics: list = field(default_factory=lambda: ["fid", "kid"])
    extractor: str = "inception"  # inception | random (cheap test net: metrics named rfid/rkid)
    inception_path: str = ""
    allow_download: bool = False  # fetch NVIDIA's Inception (needs inception_sha256: no checksum is published)
    inception_sha256: str = ""  # "" = $P2SWEEP_INCEPTION_SHA256
    ref_samples: int = 0  # 0 = the whole training set
    batch_size: int = 256
    cache_dir: str = ""
    full_at_end: bool = True  # evaluate every sampling spec at the end, not only the tracked metric's
    seed: int = 1234
    # power EMA only: also evaluate the EMA of each sigma_rel, reconstructed at every evaluation point from the
    # snapshots so far (metrics suffixed _ema0.10 ...); [] = the tracked profile alone
    ema_sigma_rels: list[float] = field(default_factory=list)
    # the cheap path: score every EMA (tracked and ema_sigma_rels) on this one cheap metric only, and compute the
    # point's metrics for the EMA it ranks first alone (named <metric>_emachosen); "" = every metric for every EMA
    ema_choose_on: str = ""


@dataclass
class TrainingConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metric: str = ""  # the tracked metric, e.g. fid10k_250 ("" = none tracked during training)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict:
        """{dotted.key: value} for every leaf (MLflow params, tables)."""
        return flatten(self.to_dict())


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# -- loading ------------------------------------------------------------------------------------------------

def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if tp is Switch:
        if isinstance(value, bool) or value == "auto":
            return value
        raise UserError(f"{key}: expected true, false or auto, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if key.endswith("train.ema_rate") and isinstance(value, str) and "," in value:
            raise UserError(f"{key}: {value!r}: a comma list of classic rates (guided-diffusion) is not supported; "
                            "track one rate, or use train.ema: {type: power} and eval.ema_sigma_rels to evaluate "
                            "EMAs of several lengths from one run")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. timestep_respacing: 250, channel_mult: 1
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list and typing.get_args(tp) == (float,):
        if isinstance(value, str):  # "0.05,0.10" (a --set or a search space value)
            value = [v for v in (x.strip() for x in value.split(",")) if v]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list of numbers, got {value!r}")
        return [_coerce(v, float, key) for v in value]
    if tp is list or origin is list:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [str(v) for v in value]
    raise UserError(f"{key}: unsupported type")  # pragma: no cover


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise UserError(f"{key}: unknown config key")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, key + ".")
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


# Keys that older versions wrote into every checkpoint's config_yaml (test-only fault injection, since removed).
# Their default 0 is dropped so those checkpoints still load; any other value is an unknown key, as for a typo.
LEGACY_ZERO_KEYS = {"train": ("inject_crash_at_images", "inject_nan_at_images")}


def drop_legacy_keys(data):
    """A shallow copy of `data` without the LEGACY_ZERO_KEYS whose value is 0; anything else is left to _build."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for sec, keys in LEGACY_ZERO_KEYS.items():
        section = out.get(sec)
        if not isinstance(section, dict):
            continue
        dead = [k for k in keys if k in section and type(section[k]) in (int, float) and section[k] == 0]
        if dead:
            out[sec] = {k: v for k, v in section.items() if k not in dead}
    return out


def config_from_dict(data: dict) -> TrainingConfig:
    cfg = _build(TrainingConfig, drop_legacy_keys(data), "")
    validate(cfg)
    return cfg


def safe_load_yaml(path: str):
    """yaml.safe_load a file; missing/unreadable/malformed files and python tags raise UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        msg = str(e).replace("\n", " ")
        raise UserError(f"{path}: not valid YAML ({msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def parse_set(items) -> dict:
    """["a.b=1", "c=[x, y]"] -> {"a.b": 1, "c": ["x", "y"]}; values parsed as YAML scalars/lists."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key.path=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"--set {k}: cannot parse value {v!r}") from None
    return out


def apply_overrides(data: dict, overrides: dict) -> dict:
    """Set dotted keys into a nested dict (a deep copy); an unknown key is reported at validation."""
    import copy

    data = copy.deepcopy(data or {})
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set {dotted}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(path: str | None = None, overrides: dict | None = None, data: dict | None = None) -> TrainingConfig:
    """A validated TrainingConfig from a YAML file (or a dict) plus dotted overrides."""
    if path is not None:
        data = safe_load_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of config sections at the top level")
    data = apply_overrides(data or {}, overrides or {})
    try:
        return config_from_dict(data)
    except UserError as e:
        if path is not None:
            raise UserError(f"{path}: {e}") from None
        raise


def validate(cfg: TrainingConfig) -> None:
    from .respace import parse_respacing
    from .schedules import SCHEDULES
    from .weighting import WEIGHTINGS, MinSNRWeighting, validate_p2

    m, d, t, e = cfg.model, cfg.diffusion, cfg.train, cfg.eval

    def need(cond, key, msg):
        if not cond:
            raise UserError(f"{key}: {msg}")

    need(m.image_size >= 8, "model.image_size", "must be >= 8")
    need(m.in_channels >= 1, "model.in_channels", "must be >= 1")
    need(m.num_channels >= 1, "model.num_channels", "must be >= 1")
    need(m.num_res_blocks >= 1, "model.num_res_blocks", "must be >= 1")
    need(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    try:
        from .arch import parse_attention_resolutions, parse_channel_mult
        parse_channel_mult(m.channel_mult, m.image_size)
        parse_attention_resolutions(m.attention_resolutions, m.image_size)
    except ValueError as ex:
        raise UserError(f"model: {ex}") from None
    need(d.diffusion_steps >= 1, "diffusion.diffusion_steps", "must be >= 1")
    need(d.noise_schedule in SCHEDULES, "diffusion.noise_schedule",
         f"unknown schedule {d.noise_schedule!r} (expected {' or '.join(SCHEDULES)})")
    need(d.weighting in WEIGHTINGS, "diffusion.weighting", f"unknown weighting {d.weighting!r} (expected {', '.join(WEIGHTINGS)})")
    for key, fn in (("diffusion.p2_gamma/p2_k", lambda: validate_p2(d.p2_gamma, d.p2_k)),
                    ("diffusion.min_snr_gamma", lambda: MinSNRWeighting(d.min_snr_gamma)),
                    ("diffusion.timestep_respacing", lambda: d.timestep_respacing and parse_respacing(d.timestep_respacing))):
        try:
            fn()
        except ValueError as ex:
            k = key
            if "p2_k" in str(ex):
                k = "diffusion.p2_k"
            elif "p2_gamma" in str(ex):
                k = "diffusion.p2_gamma"
            raise UserError(f"{k}: {ex}") from None
    need(cfg.data.dataset in ("fashion_mnist", "folder", "synthetic"), "data.dataset",
         f"unknown dataset {cfg.data.dataset!r} (expected fashion_mnist, folder or synthetic)")
    need(cfg.data.dataset != "folder" or cfg.data.path, "data.path", "required for dataset: folder")
    need(cfg.data.max_images >= 0, "data.max_images", "must be >= 0")
    need(t.total_images >= 1, "train.total_images", "must be >= 1")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    need(0.0 <= t.ema_rate < 1.0, "train.ema_rate", "must be in [0, 1)")
    em = t.ema
    need(em.type in EMA_TYPES, "train.ema.type", f"unknown EMA type {em.type!r} (expected classic or power)")
    need(len(em.sigma_rels) >= 1, "train.ema.sigma_rels", "must list at least one sigma_rel")
    for s in em.sigma_rels:
        need(0.0 < s < 0.3, "train.ema.sigma_rels", f"each must be in (0, 0.3), got {s}")
    need(len({f"{s:.4g}" for s in em.sigma_rels}) == len(em.sigma_rels), "train.ema.sigma_rels",
         f"duplicate values in {em.sigma_rels}")
    need(em.snapshot_dtype in SNAPSHOT_DTYPES, "train.ema.snapshot_dtype",
         f"unknown dtype {em.snapshot_dtype!r} (expected float16, bfloat16 or float32)")
    need(em.snapshot_every_images >= 0, "train.ema.snapshot_every_images", "must be >= 0")
    need(em.type != "power" or em.snapshot_every(t.checkpoint_every_images) > 0, "train.ema.snapshot_every_images",
         "must be > 0 with train.ema.type power when train.checkpoint_every_images is 0 (0 = every checkpoint)")
    for k in ("log_every_images", "eval_every_images", "checkpoint_every_images", "sample_every_images",
              "num_threads", "grid_samples"):
        need(getattr(t, k) >= 0, f"train.{k}", "must be >= 0")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         f"unknown device {t.device!r} (expected auto, cpu, cuda or cuda:N)")
    need(e.num_samples >= 2, "eval.num_samples", "must be >= 2 (FID needs a covariance)")
    need(len(e.sampling_steps) >= 1, "eval.sampling_steps", "must list at least one sampling spec")
    for s in e.sampling_steps:
        try:
            parse_respacing(s)
            from .respace import space_timesteps
            space_timesteps(d.diffusion_steps, parse_respacing(s))
        except ValueError as ex:
            raise UserError(f"eval.sampling_steps: {ex}") from None
    need(e.extractor in ("inception", "random"), "eval.extractor", f"unknown extractor {e.extractor!r} (expected inception or random)")
    for mname in e.metrics:
        need(mname in ("fid", "kid"), "eval.metrics", f"unknown metric {mname!r} (expected fid and/or kid)")
    need(e.ref_samples >= 0, "eval.ref_samples", "must be >= 0")
    need(not e.inception_sha256 or re.fullmatch(r"[0-9a-fA-F]{64}", e.inception_sha256), "eval.inception_sha256",
         f"expected 64 hex digits (a sha256), got {e.inception_sha256!r}")
    need(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(not e.ema_sigma_rels or em.type == "power", "eval.ema_sigma_rels",
         "needs train.ema.type: power (a classic EMA keeps no snapshots to reconstruct from)")
    from .metrics import ema_label

    for s in e.ema_sigma_rels:
        need(0.0 < s < 0.3, "eval.ema_sigma_rels", f"each must be in (0, 0.3), got {s}")
        need(round(s, 4) == s, "eval.ema_sigma_rels", f"at most 4 decimals (metric names write them), got {s}")
    need(len({ema_label(s) for s in e.ema_sigma_rels}) == len(e.ema_sigma_rels), "eval.ema_sigma_rels",
         f"duplicate values in {e.ema_sigma_rels}")
    if e.ema_choose_on:
        from .metrics import canonical_metric_name, check_metric_producible

        need(bool(e.ema_sigma_rels), "eval.ema_choose_on", "needs eval.ema_sigma_rels (the EMAs to choose among)")
        try:
            check_metric_producible(e.ema_choose_on, cfg)
        except ValueError as ex:
            raise UserError(f"eval.ema_choose_on: {ex}") from None
        e.ema_choose_on = canonical_metric_name(e.ema_choose_on)
    if cfg.metric:
        from .metrics import canonical_metric_name, check_metric_produced
        try:
            check_metric_produced(cfg.metric, cfg)
        except ValueError as ex:
            raise UserError(f"metric: {ex}") from None
        cfg.metric = canonical_metric_name(cfg.metric)  # the evaluator's spelling (kid1000_... -> kid1k_...)
