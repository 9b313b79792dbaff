"""Sweep files: one YAML per sweep, validated without importing Ray (errors name the key, exit 2).

    base: configs/fmnist_cpu.yaml      # a training config path (relative to the sweep file or the cwd) or a mapping
    overrides: {train.total_images: 6000}
    metric: kid256_ddim10              # exact metric name; the base config must produce it
    space:                             # dotted config paths -> one value kind each
      diffusion.p2_gamma: {grid: [0.0, 1.0]}
      diffusion.p2_k: {loguniform: [0.1, 10]}
      diffusion.noise_schedule: {choice: [linear, cosine]}
      train.lr: {uniform: [1e-4, 3e-4]}
      model.num_res_blocks: {randint: [1, 3]}    # inclusive
    search: {algorithm: grid|random|optuna, num_samples: 1, max_concurrent: 0, seed: 0}
    scheduler: {type: asha|none, grace_period_images: 2000, max_images: 0, reduction_factor: 3,
                rung_metrics: [kid1k_ddim10],   # multi-fidelity: rung k's own (cheaper) metric; the rest use `metric`
                ema_rule: tracked}  # or best: judged on the EMA (eval.ema_sigma_rels) of lowest mean over the seeds
    seeds: [0]                          # replicates: every configuration runs once per seed (train.seed), same values
    resources: {cpu: 1, gpu: 0}
    max_failures: 1
    storage: ""                         # default $P2SWEEP_STORAGE or ~/p2sweep
    tracking: {mlflow_uri: "", optuna_storage: "", cache_dir: "",
               s3_endpoint_url: "", s3_region: ""}   # object storage: used where AWS_ENDPOINT_URL_S3/AWS_REGION are unset
    baselines: [{name: official, checkpoint: ema.pt, overrides: {}}]   # evaluated, not trained (sweeps/record/baselines.py)
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field

from p2core.config import TrainingConfig, apply_overrides, config_from_dict, flatten, safe_load_yaml
from p2core.errors import UserError

from .baselines import parse_baselines
from .meta import validate_name
from .replicate import SEED_KEY

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = {"name", "base", "overrides", "metric", "mode", "space", "search", "scheduler", "seeds", "resources",
            "max_failures", "storage", "tracking", "description", "baselines"}


@dataclass
class Search:
    algorithm: str = "grid"     # grid | random | optuna
    num_samples: int = 1
    max_concurrent: int = 0     # 0: as many as fit (Optuna: 2 configurations x seeds)
    seed: int = 0


@dataclass
class Scheduler:
    type: str = "asha"          # asha | none
    grace_period_images: int = 0
    max_images: int = 0         # the base config's train.total_images
    reduction_factor: int = 3
    rung_metrics: list = field(default_factory=list)  # metric of rung 1, 2, ... (milestones); later rungs: `metric`
    ema_rule: str = "tracked"   # which EMA judges a configuration at a rung: tracked | best (lowest mean over seeds)


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class Tracking:
    mlflow_uri: str = ""
    optuna_storage: str = ""
    cache_dir: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""


@dataclass
class SweepSpec:
    """A validated sweep file: the one record of what a sweep is, stored (`record()`) in its p2sweep.json and read
    back (`from_record`) by every command."""
    name: str
    base: dict  # the base training config as a nested dict (overrides applied, every default filled in)
    metric: str
    space: dict  # dotted key -> (kind, values)
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    tracking: Tracking = field(default_factory=Tracking)
    seeds: list = field(default_factory=lambda: [0])
    max_failures: int = 1
    storage: str = ""
    baselines: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # the sweep file's `overrides:` (already in `base`), for the report
    description: str = ""
    source_yaml: str = ""

    @property
    def max_images(self) -> int:
        return self.scheduler.max_images

    def record(self) -> dict:
        """The JSON form kept in p2sweep.json: nested as the sweep file is, every default filled in."""
        d = asdict(self)
        d["space"] = {k: {kind: list(vals)} for k, (kind, vals) in self.space.items()}
        return d

    @classmethod
    def from_record(cls, d: dict) -> "SweepSpec":
        """The spec a `record()` was made of (TypeError/KeyError/ValueError/AttributeError for another shape)."""
        d = dict(d)
        space = {}
        for k, v in d["space"].items():
            (kind, vals), = v.items()  # one kind per key (ValueError otherwise)
            space[k] = (kind, list(vals))
        d["space"] = space
        for key, section in (("search", Search), ("scheduler", Scheduler), ("resources", Resources),
                             ("tracking", Tracking)):
            d[key] = section(**d[key])
        return cls(**d)

    def base_config(self) -> TrainingConfig:
        return config_from_dict(copy.deepcopy(self.base))

    def milestones(self) -> list[int]:
        """ASHA's rungs below the end of training (where it decides)."""
        return [r for r in self.rungs() if r < self.max_images]

    def rungs(self) -> list[int]:
        """ASHA's milestones in images: grace * rf^k up to max_images (the evaluation points must include them)."""
        sch = self.scheduler
        if sch.type != "asha":
            return []
        out, r = [], sch.grace_period_images
        while r < sch.max_images:
            out.append(int(r))
            r *= sch.reduction_factor
        return out + [sch.max_images]

    def rung_metric_map(self) -> dict:
        """{rung (images): its own metric} for the low rungs that have one."""
        return dict(zip(self.milestones(), self.scheduler.rung_metrics))

    def num_configs(self) -> int:
        """Configurations the search tries (each runs once per seed)."""
        return num_configs(self.space, self.search.algorithm, self.search.num_samples)

    def num_trials(self) -> int:
        return self.num_configs() * len(self.seeds)


def num_configs(space: dict, algorithm: str, num_samples: int) -> int:
    """How many configurations a search hands out: Optuna asks num_samples; grid and random draw num_samples per
    point of the grid (the product of the `grid` values' lengths; 1 without any)."""
    if algorithm == "optuna":
        return num_samples
    n = 1
    for kind, vals in space.values():
        if kind == "grid":
            n *= len(vals)
    return n * num_samples


def _need(cond, key, msg):
    if not cond:
        raise UserError(f"{key}: {msg}")


def _num(v, key):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    _need(isinstance(v, (int, float)) and not isinstance(v, bool), key, f"expected a number, got {v!r}")
    return v


def parse_space(raw, base_flat: dict) -> dict:
    _need(isinstance(raw, dict) and raw, "space", "expected a mapping of dotted config keys to value kinds")
    out = {}
    for key, spec in raw.items():
        k = f"space.{key}"
        _need(key in base_flat, k, "not a training config key (use dotted paths like diffusion.p2_gamma)")
        _need(key != SEED_KEY, k, "use the top-level `seeds:` list for replicates")
        _need(isinstance(spec, dict) and len(spec) == 1, k, f"expected one of {{{', '.join(KINDS)}}}: VALUES")
        kind, vals = next(iter(spec.items()))
        _need(kind in KINDS, k, f"unknown value kind {kind!r} (expected {', '.join(KINDS)})")
        _need(isinstance(vals, list) and vals, k, f"{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            _need(len(vals) == 2, k, f"{kind}: expected [low, high]")
            lo, hi = (_num(v, k) for v in vals)
            _need(lo < hi or (kind == "randint" and lo <= hi), k, f"{kind}: low must be below high")
            _need(kind != "loguniform" or lo > 0, k, "loguniform: bounds must be > 0")
            if kind == "randint":
                _need(float(lo).is_integer() and float(hi).is_integer(), k, "randint: bounds must be integers")
                vals = [int(lo), int(hi)]
            else:
                vals = [float(lo), float(hi)]
        out[key] = (kind, vals)
    return out


def load_sweep(path: str, overrides: dict | None = None) -> SweepSpec:
    raw = safe_load_yaml(path)
    _need(isinstance(raw, dict), path, "a sweep file is a mapping")
    raw = apply_overrides(raw, {k: v for k, v in (overrides or {}).items() if k.split(".")[0] in TOP_KEYS - {"overrides", "base"}})
    cfg_over = {k[len("base."):]: v for k, v in (overrides or {}).items() if k.startswith("base.")}
    bad = [k for k in (overrides or {}) if k.split(".")[0] not in TOP_KEYS | {"base"}]
    if bad:
        raise UserError(f"--set {bad[0]}: not a sweep key (use base.<config.path>=... for the training config)")
    try:
        return parse_sweep(raw, os.path.dirname(os.path.abspath(path)), cfg_over, source=open(path).read())
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def parse_sweep(raw: dict, here: str = ".", cfg_over: dict | None = None, source: str = "") -> SweepSpec:
    for k in raw:
        _need(k in TOP_KEYS, k, "unknown sweep key")
    base = raw.get("base")
    _need(base is not None, "base", "required: a training config path or mapping")
    if isinstance(base, str):
        cands = [os.path.join(here, base), base, os.path.join(here, "..", base)]
        found = next((c for c in cands if os.path.isfile(c)), None)
        _need(found, "base", f"{base}: no such training config")
        base = safe_load_yaml(found) or {}
    _need(isinstance(base, dict), "base", "expected a path or a mapping")
    ov = raw.get("overrides") or {}
    _need(isinstance(ov, dict), "overrides", "expected a mapping of dotted keys")
    base = apply_overrides(base, {**ov, **(cfg_over or {})})
    metric = raw.get("metric")
    _need(isinstance(metric, str) and metric, "metric", "required: the exact metric name, e.g. fid10k_250")
    base["metric"] = metric
    try:
        cfg = config_from_dict(copy.deepcopy(base))
    except UserError as e:
        raise UserError(f"base config: {e}") from None
    # from here on the sweep works from the validated config (every default filled in), never the raw mapping
    metric = cfg.metric  # validated: the evaluator's spelling (kid1000_ddim25 -> kid1k_ddim25)
    base = cfg.to_dict()
    _need(cfg.eval.enabled, "base.eval.enabled", "a sweep needs evaluation")
    _need(raw.get("mode", "min") == "min", "mode", "only min is supported (FID/KID: lower is better)")
    space = parse_space(raw.get("space"), flatten(cfg.to_dict()))
    # each grid/choice value must itself give a valid config
    for key, (kind, vals) in space.items():
        for v in vals if kind in ("grid", "choice") else vals:
            try:
                config_from_dict(apply_overrides(base, {key: v}))
            except UserError as e:
                raise UserError(f"space.{key}: value {v!r} gives a bad config ({e})") from None
    search = raw.get("search") or {}
    _need(isinstance(search, dict), "search", "expected a mapping")
    for k in search:
        _need(k in ("algorithm", "num_samples", "max_concurrent", "seed"), f"search.{k}", "unknown key")
    algo = search.get("algorithm", "grid")
    _need(algo in ("grid", "random", "optuna"), "search.algorithm", f"unknown algorithm {algo!r} (grid, random or optuna)")
    if algo == "optuna":
        _need(all(kind != "grid" for kind, _ in space.values()), "space",
              "optuna cannot search `grid` values: use `choice`")
    sch = raw.get("scheduler") or {}
    _need(isinstance(sch, dict), "scheduler", "expected a mapping")
    for k in sch:
        _need(k in ("type", "grace_period_images", "max_images", "reduction_factor", "rung_metrics", "ema_rule"),
              f"scheduler.{k}", "unknown key")
    ema_rule = sch.get("ema_rule", "tracked")
    _need(ema_rule in ("tracked", "best"), "scheduler.ema_rule", f"unknown rule {ema_rule!r} (tracked or best)")
    if ema_rule == "best":
        _need(bool(cfg.eval.ema_sigma_rels), "scheduler.ema_rule",
              "best needs eval.ema_sigma_rels in the base config (the post-hoc EMAs to choose from)")
        _need(not cfg.eval.ema_choose_on, "scheduler.ema_rule", "best cannot be combined with eval.ema_choose_on "
              "(which scores the other EMAs on one cheap metric only, not on each rung's)")
        swept = [k for k in space if k in ("eval.ema_sigma_rels", "eval.ema_choose_on") or k.startswith("train.ema")]
        _need(not swept, "scheduler.ema_rule", f"best cannot be combined with a searched {', '.join(swept)} "
              "(configurations would choose among different EMAs)")
    stype = sch.get("type", "asha")
    _need(stype in ("asha", "none"), "scheduler.type", f"unknown scheduler {stype!r} (asha or none)")
    max_images = int(sch.get("max_images") or cfg.train.total_images)
    _need(max_images == cfg.train.total_images, "scheduler.max_images",
          f"must equal the base config's train.total_images ({cfg.train.total_images})")
    grace = int(sch.get("grace_period_images") or max(max_images // 9, 1))
    rf = sch.get("reduction_factor", 3)
    _need(isinstance(rf, int) and rf >= 2, "scheduler.reduction_factor", "must be an integer >= 2")
    _need(0 < grace <= max_images, "scheduler.grace_period_images", f"must be in (0, {max_images}]")
    rung_metrics = sch.get("rung_metrics") or []
    _need(isinstance(rung_metrics, list) and all(isinstance(m, str) for m in rung_metrics), "scheduler.rung_metrics",
          "expected a list of metric names, one per rung from the lowest (e.g. [kid1k_ddim10, kid1k_ddim10])")
    if rung_metrics:
        _need(stype == "asha", "scheduler.rung_metrics", "needs scheduler.type: asha")
        ladder = SweepSpec(name="", base={}, metric=metric, space={},
                           scheduler=Scheduler(grace_period_images=grace, max_images=max_images, reduction_factor=rf))
        n_low = len(ladder.milestones())
        _need(len(rung_metrics) <= n_low, "scheduler.rung_metrics",
              f"{len(rung_metrics)} metrics for {n_low} rung(s) below the end of training "
              f"(the end is always judged on `metric`)")
        _need("train.batch_size" not in space, "scheduler.rung_metrics",
              "cannot be combined with a searched train.batch_size (trials would reach the rungs at different points)")
        lows = ladder.rungs()
        for r, nxt, m in zip(lows, lows[1:], rung_metrics):
            # one training step must not cross a cheap rung and the next point: one report would answer both
            _need(nxt - r >= cfg.train.batch_size, "scheduler.rung_metrics",
                  f"{m} at rung {r}: the next rung ({nxt}) is less than one batch ({cfg.train.batch_size}) away")
        from p2core.metrics import canonical_metric_name, check_metric_producible

        for m in rung_metrics:
            try:
                check_metric_producible(m, cfg)
            except ValueError as e:
                raise UserError(f"scheduler.rung_metrics: {e}") from None
        rung_metrics = [canonical_metric_name(m) for m in rung_metrics]
    seeds = raw.get("seeds", [cfg.train.seed])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
          and len(set(seeds)) == len(seeds), "seeds", "expected a non-empty list of distinct integers")
    res = raw.get("resources") or {}
    _need(isinstance(res, dict), "resources", "expected {cpu: N, gpu: N}")
    for k in res:
        _need(k in ("cpu", "gpu"), f"resources.{k}", "unknown key (cpu, gpu)")
    cpu, gpu = float(_num(res.get("cpu", 1), "resources.cpu")), float(_num(res.get("gpu", 0), "resources.gpu"))
    _need(cpu > 0, "resources.cpu", "must be > 0")
    _need(0 <= gpu <= 1, "resources.gpu", "must be in [0, 1]: one trial trains on one device (0.5 packs two "
          "trials per GPU); bigger models need a smaller train.batch_size or a bigger GPU")
    tr = raw.get("tracking") or {}
    _need(isinstance(tr, dict), "tracking", "expected a mapping")
    for k in tr:
        _need(not any(w in k.lower() for w in ("key", "secret", "token", "password", "credential")), f"tracking.{k}",
              "credentials never come from a sweep file (it is logged to MLflow): set AWS_ACCESS_KEY_ID / "
              "AWS_SECRET_ACCESS_KEY (or ~/.aws) in the environment of the driver and of every Ray node")
        _need(k in ("mlflow_uri", "optuna_storage", "cache_dir", "s3_endpoint_url", "s3_region"), f"tracking.{k}",
              "unknown key")
    for k, v in [("storage", raw.get("storage"))] + [(f"tracking.{k}", v) for k, v in tr.items()]:
        _need(not has_credentials(v), k, "a URL with a password in it: credentials never come from a sweep "
              "file (it is logged to MLflow); use the service's own variables (AWS_*, MLFLOW_TRACKING_USERNAME/"
              "PASSWORD, PGPASSWORD or ~/.pgpass)")
    ep = str(tr.get("s3_endpoint_url") or "")
    _need(not ep or ep.startswith(("http://", "https://")), "tracking.s3_endpoint_url",
          "expected http://HOST:PORT or https://HOST")
    ns = search.get("num_samples", 1)
    _need(isinstance(ns, int) and ns >= 1, "search.num_samples", "must be an integer >= 1")
    mc = search.get("max_concurrent", 0)
    _need(isinstance(mc, int) and mc >= 0, "search.max_concurrent", "must be an integer >= 0")
    mf = raw.get("max_failures", 1)
    _need(isinstance(mf, int) and mf >= 0, "max_failures", "must be an integer >= 0")
    sseed = search.get("seed", 0)
    _need(isinstance(sseed, int), "search.seed", "must be an integer")
    baselines = parse_baselines(raw.get("baselines"), base, here)
    name = validate_name(raw.get("name") or "sweep", "name")
    desc = str(raw.get("description") or "")
    return SweepSpec(name=name, base=base, metric=metric, space=space,
                     search=Search(algorithm=algo, num_samples=ns, max_concurrent=mc, seed=sseed),
                     scheduler=Scheduler(type=stype, grace_period_images=grace, max_images=max_images,
                                         reduction_factor=rf, rung_metrics=list(rung_metrics), ema_rule=ema_rule),
                     resources=Resources(cpu=cpu, gpu=gpu),
                     tracking=Tracking(mlflow_uri=str(tr.get("mlflow_uri") or ""),
                                       optuna_storage=str(tr.get("optuna_storage") or ""),
                                       cache_dir=str(tr.get("cache_dir") or ""), s3_endpoint_url=ep,
                                       s3_region=str(tr.get("s3_region") or "")),
                     seeds=seeds, max_failures=mf, storage=str(raw.get("storage") or ""), baselines=baselines,
                     overrides={**ov, **(cfg_over or {})}, description=desc, source_yaml=source)


def has_credentials(value) -> bool:
    """`scheme://user:password@host/...` or `...?password=...`: secrets that would be logged with the sweep file
    (a user name alone is not one: PGPASSWORD or ~/.pgpass give its password)."""
    from urllib.parse import parse_qs, urlsplit

    if not isinstance(value, str) or "://" not in value:
        return False
    try:
        u = urlsplit(value)
        keys = {k.lower() for k in parse_qs(u.query)}
        return bool(u.password) or bool(keys & {"password", "passwd", "secret", "token", "secret_key", "access_key"})
    except ValueError:
        return False


def describe(spec: SweepSpec) -> str:
    """The --dry-run text: trials or search setup, resources and a work estimate."""
    from p2core.plan import eval_points, generated_images

    cfg = spec.base_config()
    pts = eval_points(cfg, spec.rungs())
    n = spec.num_trials()
    lines = [f"sweep {spec.name}: metric {spec.metric} (min), search {spec.search.algorithm}, scheduler "
             f"{spec.scheduler.type}"]
    for k, (kind, vals) in spec.space.items():
        lines.append(f"  {k}: {kind} {vals}")
    lines.append(f"  seeds: {spec.seeds}; sampling specs evaluated at the end: {cfg.eval.sampling_steps}")
    if spec.scheduler.type == "asha":
        lines.append(f"  ASHA rungs (images): {spec.rungs()} (reduction factor {spec.scheduler.reduction_factor})")
        for r in spec.milestones():
            lines.append(f"    rung {r}: judged on {spec.rung_metric_map().get(r, spec.metric)}")
    lines.append(f"  resources per trial: cpu {spec.resources.cpu:g}, gpu {spec.resources.gpu:g}; max_concurrent "
                 f"{spec.search.max_concurrent or 'unlimited'}; max_failures {spec.max_failures}")
    per_img = cfg.train.total_images
    from p2core.metrics import parse_metric_name

    gen = generated_images(cfg, len(pts), [parse_metric_name(m)[1] for m in spec.rung_metric_map().values()])
    lines.append(f"  configurations: {spec.num_configs()} x {len(spec.seeds)} seed(s) = trials: {n}; per trial at most "
                 f"{per_img} images trained, {len(pts)} evaluations at {pts}, {gen} images generated")
    for b in spec.baselines:
        lines.append(f"  baseline {b['name']}: {b['checkpoint']} (evaluated, not trained; "
                     f"{cfg.eval.num_samples * len(cfg.eval.sampling_steps)} images generated)")
    lines.append(f"  at most {n * per_img} images trained and {n * gen} generated in all (ASHA stops some early)")
    return "\n".join(lines)


def format_duration(s: str) -> float:
    """"90m" / "2h" / "45s" / "1.5h" -> seconds."""
    s = str(s).strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if s[-1] in mult:
            return float(s[:-1]) * mult[s[-1]]
        return float(s)
    except (ValueError, IndexError):
        raise UserError(f"--time-budget {s!r}: expected e.g. 45m or 2h") from None
