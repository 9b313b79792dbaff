"""The single-model commands of `p2sweep` (no Ray): train, sample, eval, fid, weights."""
from __future__ import annotations

import os
import sys

from ..results.table import format_table


def _load_cfg(args, path=None):
    from p2core.config import load_config, parse_set

    return load_config(path, parse_set(args.set))


def cmd_train(args) -> int:
    cfg = _load_cfg(args, args.config)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    if args.dry_run:
        from p2core.plan import describe_training

        print(cfg.to_yaml(), end="")
        print(describe_training(cfg))
        return 0
    if args.resume and args.init_from:
        raise_user("--resume and --init-from exclude each other")
    from p2core.trainer import Trainer

    trainer = Trainer.from_config(cfg, out, resume=args.resume, init_from=args.init_from,
                                  progress=not args.no_progress)
    print(f"training {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M-parameter UNet on "
          f"{trainer.dataset_key} ({len(trainer.images)} images), device {trainer.device}, output {out}",
          file=sys.stderr)
    result = trainer.run()
    from p2core.metrics import is_metric_name, split_ema

    ev = {k: round(v, 5) for k, v in result.items() if is_metric_name(split_ema(k)[0])}
    print(f"done: {trainer.images_seen} images; metrics {ev or '(evaluation off)'}; see {out}/metrics.jsonl")
    return 0


def raise_user(msg):
    from p2core.errors import UserError

    raise UserError(msg)


def _model_and_cfg(args):
    """(EMA-or-weights model, cfg) of a p2sweep checkpoint or a bare official state_dict plus model flags."""
    from p2core.checkpoint import load_model
    from p2core.config import parse_set

    model, cfg, _ = load_model(args.checkpoint, config_file=args.config, overrides=parse_set(args.set))
    return model, cfg


def cmd_sample(args) -> int:
    import torch

    from p2core.respace import parse_respacing
    from p2core.sampling import generate, save_grid
    from p2core.trainer import resolve_device

    model, cfg = _model_and_cfg(args)
    spec = parse_spec_arg(args.steps) if args.steps else cfg.eval.sampling_steps[0]
    parse_respacing(spec)
    if args.num_samples < 1:
        raise_user("--num-samples must be >= 1")
    dev = resolve_device(cfg.train.device)
    torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
    imgs = generate(model.to(dev), cfg.diffusion, spec, args.num_samples, image_size=cfg.model.image_size,
                    channels=cfg.model.in_channels, batch_size=cfg.eval.batch_size, seed=args.seed, device=dev,
                    bf16=cfg.train.bf16, progress=True)
    print(save_grid(imgs, args.out))
    return 0


def parse_spec_arg(s):
    from p2core.respace import parse_respacing

    try:
        return parse_respacing(s)
    except ValueError as e:
        raise_user(f"--steps: {e}")


def cmd_eval(args) -> int:
    import json
    import time

    import torch

    from p2core.data import load_dataset
    from p2core.evaluation import Evaluator
    from p2core.trainer import resolve_device

    model, cfg = _model_and_cfg(args)
    if args.num_samples is not None:
        if args.num_samples < 2:
            raise_user("--num-samples must be >= 2 (FID needs a covariance)")
        cfg.eval.num_samples = args.num_samples
    specs = [parse_spec_arg(s) for s in args.steps.split(";" if ";" in args.steps else ",")] if args.steps \
        else list(cfg.eval.sampling_steps)
    dev = resolve_device(cfg.train.device)
    torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
    images, key = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels)
    ev = Evaluator(cfg, images, key, device=dev, progress=True)
    t0 = time.perf_counter()
    res = ev.evaluate_model(model.to(dev), specs, seed=cfg.eval.seed)
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(res))
        return 0
    from p2core.metrics import metric_name, steps_label

    rows = []
    for s in specs:
        row = [s]
        for kind in ("fid", "kid"):
            name = metric_name(kind, cfg.eval.num_samples, s, cfg.eval.extractor)
            row.append(f"{res[name]:.4f}" if name in res else "-")
        lab = steps_label(s)
        row.append(f"{res[f'gen_seconds_{lab}'] + res[f'feat_seconds_{lab}']:.1f}")
        rows.append(row)
    pre = "r" if cfg.eval.extractor == "random" else ""
    n = cfg.eval.num_samples
    print(f"{cfg.eval.extractor} features, {n} samples vs {res['ref_samples']} reference images")
    print(format_table(["steps", f"{pre}fid", f"{pre}kid", "seconds"], rows))
    return 0


def cmd_fid(args) -> int:
    import torch

    from p2core.evaluation import fid_from_stats, folder_features, get_extractor, kid_from_feats, stats

    for d in (args.dir_a, args.dir_b):
        if not os.path.isdir(d):
            raise_user(f"{d}: no such image folder")
    torch.set_num_threads(os.cpu_count() or 1)
    ext = get_extractor(args.extractor, args.inception_path)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fa = folder_features(args.dir_a, ext, batch_size=args.batch_size, device=dev, progress=True)
    fb = folder_features(args.dir_b, ext, batch_size=args.batch_size, device=dev, progress=True)
    ma, sa = stats(fa)
    mb, sb = stats(fb)
    pre = "r" if args.extractor == "random" else ""
    print(f"{pre}FID: {fid_from_stats(ma, sa, mb, sb):.6f}")
    print(f"{pre}KID: {kid_from_feats(fa, fb):.6f}")
    print(f"({len(fa)} vs {len(fb)} images, {ext.name})")
    return 0


def cmd_weights(args) -> int:
    from p2core.schedules import named_snr
    from p2core.weighting import MinSNRWeighting, P2Weighting, plot_weighting

    curves = []
    for sched in ("linear", "cosine"):
        snr = named_snr(sched, args.steps)
        for w in (P2Weighting(0.0, 1.0), P2Weighting(0.5, 1.0), P2Weighting(1.0, 1.0), MinSNRWeighting(5.0)):
            curves.append((f"{sched}: {w.label}", snr, w(snr)))
            print(f"{sched:6s} {w.label:24s} mean weight over uniform t = {w(snr).mean():.3f}")
    print(plot_weighting(args.out, curves, title=f"Loss weight vs SNR (T={args.steps})"))
    return 0
