"""The `p2sweep` command line: the parser and the dispatch to `model_commands` (no Ray) and `sweep_commands`.
Imports torch, Ray and MLflow lazily, inside the commands that need them, so `--help` and config errors answer at
once. User mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import sys


def _add_cfg_args(p, config_positional=False):
    if config_positional:
        p.add_argument("config", help="training config YAML (see configs/)")
    else:
        p.add_argument("--config", default=None, help="training config YAML with the model flags")
    p.add_argument("--set", dest="set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set diffusion.p2_gamma=0.5 (repeatable)")


MODEL_COMMANDS = ("train", "sample", "eval", "fid", "weights")


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
    p.add_argument("--verbose", action="store_true", help="Ray Tune's own progress output instead of the sweep's table")
    p.add_argument("--dry-run", action="store_true")

    p = sub.add_parser("resume", help="continue a sweep whose driver stopped or died")
    p.add_argument("name")
    p.add_argument("--storage", default=None)
    p.add_argument("--address", default=None)
    p.add_argument("--time-budget", default=None)
    p.add_argument("--retry-errored", action="store_true",
                   help="give trials that ended in ERROR another attempt (by default they stay errored)")
    p.add_argument("--verbose", action="store_true", help="Ray Tune's own progress output instead of the sweep's table")

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

    p = sub.add_parser("report", help="the sweep's answer as an HTML page, Markdown + PNGs and JSON")
    p.add_argument("name")
    p.add_argument("--storage", default=None)
    p.add_argument("--out", default=None, help="output folder (default <storage>/<name>/report)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the sweep's MLflow run")

    p = sub.add_parser("reroot", help="point a moved or copied storage's MLflow database and p2sweep.json at where "
                                      "it is now (resume does it too; report and ui never write)")
    p.add_argument("name")
    p.add_argument("--storage", default=None)

    p = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 for a storage's tracking store")
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--storage", default=None)
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    return ap


def main(argv=None) -> int:
    from p2core.errors import Diverged, UserError

    args = build_parser().parse_args(argv)
    try:
        if args.cmd in MODEL_COMMANDS:
            from .commands import model as commands
        else:
            from .commands import sweep as commands
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
