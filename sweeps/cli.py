"""The `p2sweep` command. Imports torch, Ray and MLflow lazily, inside the commands that need them, so `--help` and
config errors answer at once. User mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import os
import sys


def _add_cfg_args(p, config_positional=False):
    if config_positional:
        p.add_argument("config", help="training config YAML (see configs/)")
    else:
        p.add_argument("--config", default=None, help="training config YAML with the model flags")
    p.add_argument("--set", dest="set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set diffusion.p2_gamma=0.5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="p2sweep", description="P2-weighted diffusion training and Ray Tune sweeps.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one model (p2core alone, no Ray)")
    _add_cfg_args(p, config_positional=True)
    p.add_argument("--out", default=None, help="output directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--init-from", default=None, help="start from the weights of a p2sweep or official checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("sample", help="sample an image grid from a checkpoint's EMA weights")
    p.add_argument("checkpoint")
    _add_cfg_args(p)
    p.add_argument("--steps", default=None, help="sampling spec: 250, 50, ddim25 (default: the config's first)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png")

    p = sub.add_parser("eval", help="FID/KID of a checkpoint for one or more sampling specs")
    p.add_argument("checkpoint")
    _add_cfg_args(p)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--steps", default=None, help="comma list of specs, e.g. 50,250,ddim25")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")

    p = sub.add_parser("fid", help="FID and KID between two image folders (clean-fid clean mode)")
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--extractor", default="inception", choices=["inception", "random"])
    p.add_argument("--inception-path", default="")
    p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("weights", help="plot loss weight vs SNR (the paper's Fig. 3) as PNG")
    p.add_argument("--out", default="weights.png")
    p.add_argument("--steps", type=int, default=1000)

    p = sub.add_parser("run", help="run a sweep (Ray Tune)")
    p.add_argument("sweep", help="sweep YAML (see search_spaces/)")
    p.add_argument("--name", default=None)
    p.add_argument("--storage", default=None)
    p.add_argument("--address", default=None, help="attach to a Ray cluster: auto or HOST:PORT")
    p.add_argument("--set", dest="set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--time-budget", default=None, help="stop the sweep after e.g. 90m, 2h (resumable)")
    p.add_argument("--cpus", type=float, default=None, help="CPUs per trial")
    p.add_argument("--gpus", type=float, default=None, help="GPUs per trial (0.5 packs two trials per GPU)")
    p.add_argument("--dry-run", action="store_true")

    p = sub.add_parser("resume", help="continue a sweep whose driver stopped or died")
    p.add_argument("name")
    p.add_argument("--storage", default=None)
    p.add_argument("--address", default=None)
    p.add_argument("--time-budget", default=None)

    for cmd, hlp in (("status", "table of a sweep's trials"), ("best", "the best configuration of a sweep")):
        p = sub.add_parser(cmd, help=hlp)
        p.add_argument("name")
        p.add_argument("--storage", default=None)
        if cmd == "best":
            p.add_argument("--export", default=None, help="write the winning training config YAML here")
            p.add_argument("--scope", default="last", choices=["last", "best"])

    p = sub.add_parser("compare", help="compare sweeps of a storage: table and metric-vs-images plot")
    p.add_argument("names", nargs="+")
    p.add_argument("--storage", default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", default=None)

    p = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 for a storage's tracking store")
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--storage", default=None)
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    return ap


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

    trainer = Trainer(cfg, out, resume=args.resume, init_from=args.init_from, progress=not args.no_progress)
    print(f"training {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M-parameter UNet on "
          f"{trainer.dataset_key} ({len(trainer.images)} images), device {trainer.device}, output {out}",
          file=sys.stderr)
    result = trainer.run()
    from p2core.metrics import is_metric_name

    ev = {k: round(v, 5) for k, v in result.items() if is_metric_name(k)}
    print(f"done: {trainer.images_seen} images; metrics {ev or '(evaluation off)'}; see {out}/metrics.jsonl")
    return 0


def raise_user(msg):
    from p2core.errors import UserError

    raise UserError(msg)


def _model_and_cfg(args):
    """(ema-or-weights model, cfg) for a p2sweep checkpoint or a bare official state_dict plus flags."""
    import yaml

    from p2core import checkpoint as ck
    from p2core.config import apply_overrides, config_from_dict, load_config, parse_set, safe_load_yaml
    from p2core.unet import load_weights, model_from_config

    obj = ck.load_file(args.checkpoint)
    if ck.is_p2sweep_checkpoint(obj):
        base = yaml.safe_load(obj["config_yaml"])
        if args.config:
            extra = safe_load_yaml(args.config) or {}
            for sec, vals in extra.items():
                if isinstance(vals, dict):
                    base.setdefault(sec, {}).update(vals)
                else:
                    base[sec] = vals
        cfg = config_from_dict(apply_overrides(base, parse_set(args.set)))
    else:
        cfg = load_config(args.config, parse_set(args.set))
    sd, _ = ck.weights_from(obj)
    model = model_from_config(cfg)
    load_weights(model, sd, args.checkpoint)
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
    from p2core.metrics import metric_name

    rows = []
    for s in specs:
        row = [s]
        for kind in ("fid", "kid"):
            name = metric_name(kind, cfg.eval.num_samples, s, cfg.eval.extractor)
            row.append(f"{res[name]:.4f}" if name in res else "-")
        lab = s.replace(",", "-")
        row.append(f"{res[f'gen_seconds_{lab}'] + res[f'feat_seconds_{lab}']:.1f}")
        rows.append(row)
    pre = "r" if cfg.eval.extractor == "random" else ""
    n = cfg.eval.num_samples
    print(f"{cfg.eval.extractor} features, {n} samples vs {res['ref_samples']} reference images")
    print(format_table(["steps", f"{pre}fid", f"{pre}kid", "seconds"], rows))
    return 0


def format_table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


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


def main(argv=None) -> int:
    from p2core.errors import Diverged, UserError

    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "fid": cmd_fid, "weights": cmd_weights}
    try:
        if args.cmd in handlers:
            return handlers[args.cmd](args)
        from . import commands

        return getattr(commands, f"cmd_{args.cmd}")(args)
    except UserError as e:
        print(f"p2sweep: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"p2sweep: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("p2sweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
