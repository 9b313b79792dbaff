"""Sweep commands of the `p2sweep` CLI (imported only when one of them runs)."""
from __future__ import annotations

import os
import sys

from p2core.errors import UserError

from . import results as R
from .cli import format_table


def cmd_run(args) -> int:
    from p2core.config import parse_set

    from .spec import describe, format_duration, load_sweep

    spec = load_sweep(args.sweep, parse_set(args.set))
    if args.cpus is not None:
        if args.cpus <= 0:
            raise UserError("--cpus must be > 0")
        spec.cpu = args.cpus
        spec.raw["resources"] = {**(spec.raw.get("resources") or {}), "cpu": args.cpus}
    if args.gpus is not None:
        if args.gpus < 0:
            raise UserError("--gpus must be >= 0")
        spec.gpu = args.gpus
        spec.raw["resources"] = {**(spec.raw.get("resources") or {}), "gpu": args.gpus}
    name = args.name or spec.name
    budget = format_duration(args.time_budget) if args.time_budget else None
    storage = R.storage_root(args.storage or spec.storage or None)
    if args.dry_run:
        print(describe(spec))
        print(f"  storage: {os.path.join(storage, name)}")
        return 0
    from .runner import run

    return run(spec, name, storage, args.address, budget, spec_dir=os.path.dirname(os.path.abspath(args.sweep)))


def cmd_resume(args) -> int:
    from .runner import resume
    from .spec import format_duration

    return resume(args.name, args.storage, args.address, format_duration(args.time_budget) if args.time_budget else None)


def _trials(name, storage):
    meta = R.load_meta(name, storage)
    d = os.path.join(meta["paths"]["storage"], name)
    return meta, R.load_trials(d, meta["metric"], meta["max_images"])


def _baseline_rows(name, storage, meta):
    """[(baseline name, metric name, value)] for the sweep's metric family (every sampling spec)."""
    from p2core.metrics import is_metric_name, parse_metric_name

    from .baselines import load_results

    kind, n, _ = parse_metric_name(meta["metric"])
    rows = []
    for bname, res in load_results(os.path.join(meta["paths"]["storage"], name)).items():
        for k, v in sorted(res.items()):
            if is_metric_name(k) and parse_metric_name(k)[:2] == (kind, n):
                rows.append((bname, k, v))
    return rows


def _print_baselines(name, storage, meta, heading):
    rows = _baseline_rows(name, storage, meta)
    if rows:
        print(heading)
        print(format_table(["baseline", "metric", "value"], [[x, m, f"{v:.5g}"] for x, m, v in rows]))


def cmd_status(args) -> int:
    meta, trials = _trials(args.name, args.storage)
    header, rows = R.status_rows(trials, meta["metric"])
    print(f"sweep {args.name}: {len(trials)} trial(s), metric {meta['metric']}, max {meta['max_images']} images")
    print(format_table(header, rows))
    _print_baselines(args.name, args.storage, meta, "baselines (evaluated, not trained):")
    return 0


def cmd_best(args) -> int:
    meta, trials = _trials(args.name, args.storage)
    rows = R.group_rows(trials, meta["metric"], args.scope)
    if not rows:
        raise UserError(f"sweep {args.name!r} has no evaluated trial yet")
    keys = sorted({k for r in rows for k in r["config"]})
    header = keys + ["steps", "mean", "std", "seeds", "full length"]
    table = [[str(r["config"].get(k, "-")) for k in keys] + [r["spec"], f"{r['mean']:.5g}", f"{r['std']:.3g}",
                                                             str(r["n"]), "yes" if r["complete"] else "no"]
             for r in rows]
    print(f"sweep {args.name}: ranked by {meta['metric'].split('_')[0]}_<steps> ({args.scope} evaluation, "
          f"mean over seeds; full-length trials first)")
    print(format_table(header, table))
    _print_baselines(args.name, args.storage, meta, "baselines (evaluated, not trained; not ranked):")
    best = rows[0]
    print(f"best: {best['config']} with steps {best['spec']}: {best['mean']:.5g} +- {best['std']:.3g}")
    if args.export:
        from p2core.atomic import atomic_write_text

        atomic_write_text(args.export, R.best_export_yaml(meta, best))
        print(f"exported: {args.export}  (train it: p2sweep train {args.export})")
    return 0


def cmd_compare(args) -> int:
    from .runner import plot_history

    header, table, all_trials = None, [], {}
    for name in args.names:
        meta, trials = _trials(name, args.storage)
        all_trials[name] = trials
        for r in R.group_rows(trials, meta["metric"]):
            cfg = ", ".join(f"{k}={v}" for k, v in sorted(r["config"].items()))
            table.append([name, cfg, r["metric"], f"{r['mean']:.5g}", f"{r['std']:.3g}", str(r["n"]),
                          "yes" if r["complete"] else "no"])
        for bname, m, v in _baseline_rows(name, args.storage, meta):
            table.append([name, f"baseline {bname}", m, f"{v:.5g}", "-", "1", "baseline"])
    header = ["sweep", "config", "metric", "mean", "std", "seeds", "full length"]
    print(format_table(header, table))
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([header] + table)
    plot = args.plot or "compare.png"
    if plot_history(plot, all_trials, "metric"):
        print(f"plot: {plot}")
    return 0


def cmd_ui(args) -> int:
    import shutil
    import subprocess

    storage = R.storage_root(args.storage)
    uri = "sqlite:///" + os.path.join(os.path.abspath(storage), "mlflow.db")
    exp_path = ""
    if args.name:
        meta = R.load_meta(args.name, args.storage)
        uri = meta["paths"]["mlflow_uri"]
        from .tracking import client

        exp = client(uri).get_experiment_by_name(meta["experiment"])
        if exp is not None:
            exp_path = f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    elif not os.path.exists(os.path.join(storage, "mlflow.db")):
        raise UserError(f"no MLflow database in {storage}")
    mlflow_bin = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    print(f"MLflow UI: http://{args.host}:{args.port}/{exp_path}   (Ctrl-C stops it)")
    cmd = [mlflow_bin, "server", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
           "--default-artifact-root", os.path.join(os.path.abspath(storage), "mlartifacts")]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
