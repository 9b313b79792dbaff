"""The sweep commands of `p2sweep`: run, resume, status, best, compare, ui (imported only when one of them runs).
Ray is imported only by run/resume, after `ray_env.prepare` has set what Ray must see at import time."""
from __future__ import annotations

import json
import math
import os
import sys

from p2core.errors import UserError

from . import results as R
from . import storage as S
from .meta import load_meta, storage_root, validate_name
from .table import format_table


def cmd_run(args) -> int:
    from p2core.config import parse_set

    from .spec import describe, format_duration, load_sweep

    sets = parse_set(args.set)
    # --cpus/--gpus are sweep-file keys given on the command line: the same validation applies
    if args.cpus is not None:
        sets["resources.cpu"] = args.cpus
    if args.gpus is not None:
        sets["resources.gpu"] = args.gpus
    spec = load_sweep(args.sweep, sets)
    name = validate_name(spec.name if args.name is None else args.name)
    budget = format_duration(args.time_budget) if args.time_budget else None
    storage = storage_root(args.storage or spec.storage or None)
    if args.dry_run:
        print(describe(spec))
        print(f"  storage: {os.path.join(storage, name)}")
        return 0
    from .runner import run

    return run(spec, name, storage, args.address, budget, spec_dir=os.path.dirname(os.path.abspath(args.sweep)))


def cmd_resume(args) -> int:
    from .runner import resume
    from .spec import format_duration

    validate_name(args.name, "NAME")
    return resume(args.name, args.storage, args.address,
                  format_duration(args.time_budget) if args.time_budget else None, retry_errored=args.retry_errored)


def _trials(name, storage):
    meta = load_meta(name, storage)
    return meta, R.load_trials(meta.dir, meta.metric)


def _baseline_rows(meta):
    """[(baseline name, metric name, value)] for the sweep's metric family (every sampling spec)."""
    from p2core.metrics import is_metric_name, parse_metric_name

    from .baselines import load_results

    kind, n, _ = parse_metric_name(meta.metric)
    rows = []
    for bname, res in load_results(meta.dir).items():
        for k, v in sorted(res.items()):
            if is_metric_name(k) and parse_metric_name(k)[:2] == (kind, n):
                rows.append((bname, k, v))
    return rows


def _print_baselines(meta, heading):
    rows = _baseline_rows(meta)
    if rows:
        print(heading)
        print(format_table(["baseline", "metric", "value"], [[x, m, f"{v:.5g}"] for x, m, v in rows]))


def cmd_status(args) -> int:
    meta, trials = _trials(args.name, args.storage)
    header, rows = R.status_rows(trials, meta.metric)
    print(f"sweep {args.name}: {len(trials)} trial(s), metric {meta.metric}, max {meta.max_images} images, "
          f"seeds {meta.seeds}")
    print(format_table(header, rows))
    if any(t.state == "ERROR" for t in trials):
        print("ERROR trials stay errored on `p2sweep resume`; `p2sweep resume --retry-errored` gives them another "
              "attempt from their last checkpoint")
    _print_baselines(meta, "baselines (evaluated, not trained):")
    return 0


def _seeds_cell(r: R.Row) -> str:
    return f"{r.n}/{r.seeds_expected}" + (" (lost seeds)" if r.lost else "")


def cmd_best(args) -> int:
    meta, trials = _trials(args.name, args.storage)
    rows = R.group_rows(trials, meta.metric, meta.max_images, len(meta.seeds), args.scope)
    if not rows:
        raise UserError(f"sweep {args.name!r} has no evaluated trial yet")
    keys = sorted({k for r in rows for k in r.config})
    header = ["config"] + keys + ["steps", "images", "mean", "std", "seeds", "complete",
                                  f"checkpoint of its first seed (in {meta.dir})"]
    table = [[str(r.group)] + [str(r.config.get(k, "-")) for k in keys] +
             [r.spec, str(r.images_seen), f"{r.mean:.5g}", f"{r.std:.3g}", _seeds_cell(r),
              "yes" if r.complete else "no",
              os.path.relpath(r.checkpoints[0], meta.dir) if r.checkpoints and r.checkpoints[0] else "-"]
             for r in rows]
    print(f"sweep {args.name}: ranked by {meta.metric.split('_')[0]}_<steps> ({args.scope} evaluation, mean over the "
          f"seeds that reached the same point; complete rows first, rows that lost seeds last)")
    print(format_table(header, table))
    _print_baselines(meta, "baselines (evaluated, not trained; not ranked):")
    best = rows[0]
    note = "" if best.complete else "  (NOT complete: no configuration finished with all its seeds)"
    print(f"best: {best.config} with steps {best.spec}: {best.mean:.5g} +- {best.std:.3g} over {best.n} seed(s){note}")
    if best.checkpoints and best.checkpoints[0]:
        ck = S.join(best.checkpoints[0], "trainer.pt")
        if S.is_uri(ck):  # sample/eval read local files
            print(f"checkpoint: {ck}  (copy it here first, e.g. `aws s3 cp {ck} trainer.pt`, then "
                  f"p2sweep sample trainer.pt --steps {best.spec})")
        else:
            print(f"checkpoint: {ck}  (p2sweep sample {ck} --steps {best.spec})")
    if args.export:
        from p2core.atomic import atomic_write_text

        atomic_write_text(args.export, R.best_export_yaml(meta, best, trials))
        print(f"exported: {args.export}  (train it: p2sweep train {args.export})")
    return 0


def compare_table(sweeps: dict) -> tuple[list, list]:
    """One row per (sweep, configuration): the swept parameters and the metric at each sampling spec as columns
    ("mean +- std (counted/expected seeds)"), the best configuration first by each sweep's own metric (as the MLflow
    view `p2sweep ui` opens); then the baseline rows. `sweeps`: {name: (meta, trials)}."""
    keys, names, out, base_rows = [], [], [], []
    for name, (meta, trials) in sweeps.items():
        rows = R.group_rows(trials, meta.metric, meta.max_images, len(meta.seeds))
        for k in sorted({k for r in rows for k in r.config}):
            if k not in keys:
                keys.append(k)
        for m in [meta.metric] + sorted({r.metric for r in rows}):
            if m not in names:
                names.append(m)
        by_group: dict = {}
        for r in rows:  # a trial without a group key is its own configuration (as in group_rows)
            gk = r.group if r.group >= 0 else json.dumps(r.config, sort_keys=True, default=str)
            by_group.setdefault(gk, {})[r.metric] = r
        for g, ms in by_group.items():
            first = next(iter(ms.values()))
            own = ms.get(meta.metric)
            key = (own is None or not own.complete, own.mean if own is not None else math.inf)
            out.append(((list(sweeps).index(name), *key), name, g, first.config, ms))  # ranked within its sweep
        for bname, m, v in _baseline_rows(meta):
            base_rows.append((name, bname, m, v))
    out.sort(key=lambda x: x[0])
    header = ["sweep", "config"] + keys + names + ["complete"]
    table = []
    for _, name, g, config, ms in out:
        cells = []
        for m in names:
            r = ms.get(m)
            cells.append("-" if r is None else f"{r.mean:.5g} +- {r.std:.2g} ({_seeds_cell(r)}, {r.images_seen} img)")
        table.append([name, str(g)] + [str(config.get(k, "-")) for k in keys] + cells +
                     ["yes" if all(r.complete for r in ms.values()) else "no"])
    for name, bname, m, v in base_rows:
        table.append([name, f"baseline {bname}"] + ["-"] * len(keys) +
                     [f"{v:.5g}" if x == m else "-" for x in names] + ["baseline"])
    return header, table


def cmd_compare(args) -> int:
    from .plots import plot_history

    sweeps = {name: _trials(name, args.storage) for name in args.names}
    header, table = compare_table(sweeps)
    print(format_table(header, table))
    if args.csv:
        import csv

        from p2core.atomic import atomic_write

        atomic_write(args.csv, lambda f: csv.writer(f).writerows([header] + table), binary=False)
    plot = args.plot or "compare.png"
    if plot_history(plot, {name: trials for name, (_, trials) in sweeps.items()}, "metric"):
        print(f"plot: {plot}")
    return 0


def _expected_trials(meta) -> int | None:
    raw = meta.raw or {}
    search = raw.get("search") or {}
    n = int(search.get("num_samples", 1) or 1)
    if search.get("algorithm", "grid") != "optuna":  # Tune expands grid values for random search too
        for v in (raw.get("space") or {}).values():
            if isinstance(v, dict) and "grid" in v:
                n *= len(v["grid"])
    return n * len(meta.seeds)


def _provenance(meta) -> dict:
    """The versions and git commit the sweep ran with (its parent MLflow run), or those of this process."""
    try:
        from .tracking import client

        p = client(meta.paths.mlflow_uri).get_run(meta.parent_run_id).data.params
        out = {k: v for k, v in p.items() if k.startswith("version.") or k == "git_commit"}
        if out:
            return out
    except Exception as e:
        print(f"p2sweep: warning: MLflow at {meta.paths.mlflow_uri} not readable ({(str(e).splitlines() or [type(e).__name__])[0][:120]}); "
              "provenance is that of this process", file=sys.stderr)
    from .runner import provenance

    return {**provenance(), "note": "at report time (the sweep's MLflow run was not readable)"}


def cmd_report(args) -> int:
    import tempfile

    meta, trials = _trials(args.name, args.storage)
    if not trials:
        raise UserError(f"sweep {args.name!r} has no trial yet: nothing to report")
    if not args.no_mlflow:
        from .tracking import follow_move

        follow_move(meta)
    with tempfile.TemporaryDirectory() as tmp:
        if S.is_uri(meta.dir):  # the page embeds the sample grids: read them out of the bucket once
            trials = _local_copies(trials, tmp)
        return _report(args, meta, trials, tmp)


def _local_copies(trials: list, tmp: str) -> list:
    """The trials with their result.json and sample grids copied into `tmp` (their `dir` pointing there)."""
    import dataclasses

    out = []
    for t in trials:
        if not t.dir:
            out.append(t)
            continue
        d = os.path.join(tmp, S.basename(t.dir))
        S.download(S.join(t.dir, "result.json"), os.path.join(d, "result.json"))
        S.download(S.join(t.dir, "p2", "samples"), os.path.join(d, "p2", "samples"))
        out.append(dataclasses.replace(t, dir=d))
    return out


def _report(args, meta, trials, tmp: str) -> int:
    from . import report_page
    from .baselines import load_results

    importance = None
    if (meta.raw.get("search") or {}).get("algorithm") == "optuna":
        from .schedulers import param_importance

        importance = param_importance(meta.paths.optuna_storage, meta.study_name,
                                      report_page.MIN_IMPORTANCE_TRIALS)
    data = report_page.collect(meta, trials, provenance=_provenance(meta), baselines=load_results(meta.dir),
                               importance=importance, expected_trials=_expected_trials(meta))
    remote = S.is_uri(meta.dir) and not args.out
    out = args.out or (os.path.join(tmp, "report") if remote else os.path.join(meta.dir, "report"))
    paths = report_page.write_report(out, data, trials)
    if remote:  # written here, then copied into the sweep's folder in the bucket (the old report's files go first)
        S.remove_tree(S.join(meta.dir, "report"))
        S.upload_dir(paths["dir"], S.join(meta.dir, "report"))
        paths = {k: S.join(meta.dir, "report", os.path.relpath(v, paths["dir"])) if k != "dir" else v
                 for k, v in paths.items()}
    for c in data["comparisons"]:
        if c["headline"] and c["metric"] == meta.metric:
            print(c["sentence"])
    print(f"report ({data['sweep']['state']}): {paths['html']}  (also report.md, report.json, figures/)")
    if not args.no_mlflow:
        try:
            from .tracking import client

            client(meta.paths.mlflow_uri).log_artifacts(meta.parent_run_id, paths["dir"], "report")
            print(f"logged to MLflow run {meta.parent_run_id} under report/")
        except Exception as e:
            print(f"p2sweep: warning: report not logged to MLflow ({(str(e).splitlines() or [type(e).__name__])[0][:160]})", file=sys.stderr)
    return 0


def cmd_ui(args) -> int:
    import shutil
    import subprocess

    from .ray_env import privacy_env

    privacy_env()  # before MLflow is imported: its telemetry is on by default
    storage = storage_root(args.storage)
    uri = "sqlite:///" + os.path.join(storage, "mlflow.db")
    exp_path = ""
    if args.name:
        meta = load_meta(args.name, args.storage)
        from .tracking import client, follow_move, set_sweep_view

        follow_move(meta)
        uri = meta.paths.mlflow_uri

        c = client(uri)
        exp = c.get_experiment_by_name(meta.experiment)
        if exp is not None:
            exp_path = f"#/experiments/{exp.experiment_id}/runs"
            try:
                exp_path = set_sweep_view(c, exp.experiment_id, meta, R.load_trials(meta.dir, meta.metric))
            except Exception as e:  # the plain runs page still works
                print(f"p2sweep: warning: comparison view not written ({(str(e).splitlines() or [type(e).__name__])[0][:160]})",
                      file=sys.stderr)
        if uri.startswith(("http://", "https://")):  # the sweep tracks to a server: its own UI is the UI
            print(f"MLflow UI of this sweep (its tracking server): {uri.rstrip('/')}/{exp_path}")
            return 0
    elif not os.path.exists(os.path.join(storage, "mlflow.db")):
        raise UserError(f"no MLflow database in {storage}")
    from .tracking import artifact_root

    mlflow_bin = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    print(f"MLflow UI: http://{args.host}:{args.port}/{exp_path}   (Ctrl-C stops it)")
    cmd = [mlflow_bin, "server", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
           "--default-artifact-root", artifact_root(uri) or S.join(storage, "mlartifacts")]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
