"""The sweep commands of `p2sweep`: run, resume, status, best, compare, ui (imported only when one of them runs).
Ray is imported only by run/resume, after `ray_env.prepare` has set what Ray must see at import time."""
from __future__ import annotations

import os
import sys

from p2core.errors import UserError
from p2core.metrics import CHOSEN

from .. import compat
from ..results import trials as R
from ..storage import fs as S
from ..storage import layout as L
from ..storage import trial_files as TF
from ..record.meta import load_meta, storage_root, validate_name
from ..results.table import format_table


def cmd_run(args) -> int:
    from p2core.config import parse_set

    from ..record.spec import describe, format_duration, load_sweep

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
    from ..tune.runner import run

    return run(spec, name, storage, args.address, budget, spec_dir=os.path.dirname(os.path.abspath(args.sweep)),
               verbose=args.verbose)


def cmd_resume(args) -> int:
    from ..tune.runner import resume
    from ..record.spec import format_duration

    validate_name(args.name, "NAME")
    return resume(args.name, args.storage, args.address,
                  format_duration(args.time_budget) if args.time_budget else None, retry_errored=args.retry_errored,
                  verbose=args.verbose)


def _trials(name, storage):
    meta = load_meta(name, storage)
    return meta, R.load_trials(meta.dir, meta.metric, meta.spec.milestones())


def _baseline_rows(meta):
    """[(baseline name, metric name, value)] for the sweep's metric family (every sampling spec)."""
    from p2core.metrics import same_family

    from ..record.baselines import load_results

    rows = []
    for bname, res in load_results(meta.dir).items():
        for k, v in sorted(res.items()):
            if same_family(k, meta.metric):
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
    emas = any(r.ema is not None for r in rows)
    header = ["config"] + keys + ["steps"] + (["ema"] if emas else []) + [
        "images", "mean", "std", "seeds", "complete", f"checkpoint of its first seed (in {meta.dir})"]
    table = [[str(r.group)] + [str(r.config.get(k, "-")) for k in keys] + [r.spec] + ([r.ema_label] if emas else []) +
             [str(r.images_seen), f"{r.mean:.5g}", f"{r.std:.3g}", _seeds_cell(r),
              "yes" if r.complete else "no",
              os.path.relpath(r.checkpoints[0], meta.dir) if r.checkpoints and r.checkpoints[0] else "-"]
             for r in rows]
    by = f"{meta.metric.split('_')[0]}_<steps>" + ("[_ema<sigma_rel>|_emachosen]" if emas else "")
    print(f"sweep {args.name}: ranked by {by} ({args.scope} evaluation, mean over the seeds that reached the same "
          f"point; complete rows (every seed trained to the end) first, rows that lost seeds last)")
    if emas:
        print("ema: `tracked` is the EMA profile evaluated during training; a sigma_rel is that EMA reconstructed post "
              "hoc from the snapshots; `chosen (...)` is, per seed, the EMA the cheap metric eval.ema_choose_on "
              "ranked first at that point (the sigma_rels it chose); the best row is the minimum over every "
              "(steps, ema), an optimistic choice")
    print(format_table(header, table))
    _print_baselines(meta, "baselines (evaluated, not trained; not ranked):")
    best = rows[0]
    note = "" if best.complete else "  (NOT complete: no configuration finished with all its seeds)"
    ema = "" if best.ema is None else f", EMA {best.ema_label}" if best.ema == CHOSEN else \
        f", EMA sigma_rel {best.ema:g}"
    print(f"best: {best.config} with steps {best.spec}{ema}: {best.mean:.5g} +- {best.std:.3g} over {best.n} "
          f"seed(s){note}")
    if best.checkpoints and best.checkpoints[0]:
        ck = S.join(best.checkpoints[0], "trainer.pt")
        if S.is_uri(ck):  # sample/eval read local files
            print(f"checkpoint: {ck}  (copy it here first, e.g. `aws s3 cp {ck} trainer.pt`, then "
                  f"p2sweep sample trainer.pt --steps {best.spec})")
        else:
            print(f"checkpoint: {ck}  (p2sweep sample {ck} --steps {best.spec})")
    if best.sigma_rel is not None and not args.export:
        print(f"note: the checkpoint holds the tracked EMA; `--export FILE` also writes the EMA of sigma_rel "
              f"{best.sigma_rel:g} (reconstructed from the snapshots) as a bare state_dict")
    if args.export:
        from p2core.atomic import atomic_write_text

        atomic_write_text(args.export, R.best_export_yaml(meta, best, trials))
        print(f"exported: {args.export}  (train it: p2sweep train {args.export})")
        if best.sigma_rel is not None:
            w = R.export_ema_weights(best, trials, R.ema_weights_path(args.export, best))
            print(f"exported: {w}  (the EMA of sigma_rel {best.sigma_rel:g} at {best.images_seen} images, a bare "
                  f"state_dict with the official P2 key names)")
    return 0


def compare_table(sweeps: dict) -> tuple[list, list]:
    """One row per (sweep, configuration): the swept parameters and the metric at each sampling spec as columns
    ("mean +- std (counted/expected seeds)"), ranked within its sweep as `best` ranks (`results.config_order`: each
    configuration by its best row, complete rows first, rows that lost seeds last); then the baseline rows.
    `sweeps`: {name: (meta, trials)}."""
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
            by_group.setdefault(r.config_key, {})[r.metric] = r
        for g in R.config_order(rows):  # the one ranking: no tier of its own here
            ms = by_group[g]
            out.append((name, g, next(iter(ms.values())).config, ms))
        for bname, m, v in _baseline_rows(meta):
            base_rows.append((name, bname, m, v))
    header = ["sweep", "config"] + keys + names + ["complete"]
    table = []
    for name, g, config, ms in out:
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
    from ..results.plots import plot_history

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


def _provenance(meta, uri: str) -> dict:
    """The versions and git commit the sweep ran with (its parent MLflow run at `uri`), or those of this process."""
    try:
        from ..tracking.client import client

        p = client(uri).get_run(meta.parent_run_id).data.params
        out = {k: v for k, v in p.items() if k.startswith("version.") or k == "git_commit"}
        if out:
            return out
    except Exception as e:
        from ..tracking.client import one_line, shown

        print(f"p2sweep: warning: MLflow at {shown(uri)} not readable ({one_line(e, 120)}); "
              "provenance is that of this process", file=sys.stderr)
    from ..tune.runner import provenance

    return {**provenance(), "note": "at report time (the sweep's MLflow run was not readable)"}


def cmd_report(args) -> int:
    import tempfile

    meta, trials = _trials(args.name, args.storage)
    if not trials:
        raise UserError(f"sweep {args.name!r} has no trial yet: nothing to report")
    # read-only: a storage found under another root is not re-rooted here (it may be another machine's mount point
    # of a folder whose driver still writes it); `resume` and `reroot` do that
    with tempfile.TemporaryDirectory() as tmp:
        if S.is_uri(meta.dir):  # the page embeds the sample grids: read them out of the bucket once
            trials = _local_copies(trials, tmp)
        return _report(args, meta, trials, tmp)


def _moved_note(meta) -> str:
    return (f"the storage moved from {meta.moved_from} and its MLflow database still points there (`p2sweep reroot "
            f"{meta.name} --storage {meta.paths.storage}` or `p2sweep resume` points it here, once no driver writes "
            f"it from the old path)")


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
        S.download(TF.samples_dir(t.dir), TF.samples_dir(d))
        out.append(dataclasses.replace(t, dir=d))
    return out


def _report(args, meta, trials, tmp: str) -> int:
    from ..results import report_data
    from ..results import report_page
    from ..record.baselines import load_results
    from ..tracking.client import read_only_uri, shown

    importance = None
    if meta.spec.search.algorithm == "optuna":
        from ..tune.schedulers import param_importance

        # the address comes from p2sweep.json, which whoever can write the storage chooses: say it before connecting
        print(f"p2sweep: reading Optuna at {shown(meta.paths.optuna_storage)} (from p2sweep.json)", file=sys.stderr)
        importance = param_importance(meta.paths.optuna_storage, meta.study_name,
                                      report_data.MIN_IMPORTANCE_TRIALS)
    uri = read_only_uri(meta)
    data = report_data.collect(meta, trials, provenance=_provenance(meta, uri), baselines=load_results(meta.dir),
                               importance=importance, expected_trials=meta.spec.num_trials())
    remote = S.is_uri(meta.dir) and not args.out
    out = args.out or (os.path.join(tmp, "report") if remote else os.path.join(meta.dir, "report"))
    paths = report_page.write_report(out, data, trials)
    if remote:  # written here, then copied over the bucket's report (the pages last), then its stale files deleted
        entries = tuple(os.path.relpath(v, paths["dir"]).replace(os.sep, "/") for k, v in paths.items()
                        if k != "dir" and os.path.isfile(v))
        S.sync_dir(paths["dir"], S.join(meta.dir, "report"), last=entries)
        paths = {k: S.join(meta.dir, "report", os.path.relpath(v, paths["dir"])) if k != "dir" else v
                 for k, v in paths.items()}
    for c in data["comparisons"]:
        if c["headline"] and c["metric"] == meta.metric:
            print(c["sentence"])
    print(f"report ({data['sweep']['state']}): {paths['html']}  (also report.md, report.json, figures/)")
    if args.no_mlflow:
        return 0
    if meta.moved_from and uri == meta.paths.mlflow_uri and L.in_storage(uri, meta.paths.storage):
        # its runs' artifact locations are under the old root: logging would write there (or fail), so not at all
        print(f"p2sweep: report not logged to MLflow: {_moved_note(meta)}", file=sys.stderr)
        return 0
    from ..tracking.client import client, one_line

    try:
        client(uri).log_artifacts(meta.parent_run_id, paths["dir"], "report")
        print(f"logged to MLflow run {meta.parent_run_id} under report/")
    except Exception as e:
        print(f"p2sweep: warning: report not logged to MLflow ({one_line(e)})", file=sys.stderr)
    return 0


def cmd_reroot(args) -> int:
    """`p2sweep reroot NAME --storage S`: point a moved or copied storage's own MLflow database at where it is now
    and record the new root in its `p2sweep.json` (what `resume` does first). Never while a driver still writes the
    sweep from the old path (another machine's mount point of the same folder)."""
    from ..tracking.repair import follow_move

    meta = load_meta(validate_name(args.name, "NAME"), args.storage)
    if not meta.moved_from:
        print(f"p2sweep: sweep {args.name} is where p2sweep.json says ({meta.paths.storage}): nothing to re-root")
        return 0
    old = meta.moved_from
    follow_move(meta)
    print(f"sweep {args.name}: re-rooted from {old} to {meta.paths.storage}")
    return 0


def cmd_ui(args) -> int:
    import shutil
    import subprocess

    from ..tune.ray_env import privacy_env

    privacy_env()  # before MLflow is imported: its telemetry is on by default
    storage = storage_root(args.storage)
    uri = L.mlflow_db_uri(storage)
    exp_path = ""
    if args.name:
        # read-only: no re-rooting of a moved storage and no view written (`run`/`resume` write the view at the end)
        meta = load_meta(args.name, args.storage)
        from ..tracking.client import client, is_http, one_line, read_only_uri, shown
        from ..tracking.view import VIEW_KEY

        uri = read_only_uri(meta)
        if L.sqlite_file(uri) and not os.path.isfile(L.sqlite_file(uri)):  # MLflow would create one
            raise UserError(f"sweep {args.name}: no MLflow database at {L.sqlite_file(uri)}")
        if meta.moved_from and uri == meta.paths.mlflow_uri and L.in_storage(uri, meta.paths.storage):
            print(f"p2sweep: note: artifacts may not show: {_moved_note(meta)}", file=sys.stderr)
        try:
            exp = client(uri).get_experiment_by_name(meta.experiment)
        except Exception as e:  # the address still answers a browser later, or says why
            exp = None
            print(f"p2sweep: warning: MLflow at {shown(uri)} not readable ({one_line(e)})",
                  file=sys.stderr)
        if exp is not None:
            shared = compat.shared_view_tag(VIEW_KEY) in (exp.tags or {})
            exp_path = compat.runs_page(exp.experiment_id, VIEW_KEY if shared else "")
        if is_http(uri):  # the sweep tracks to a server: its own UI is the UI
            print(f"MLflow UI of this sweep (its tracking server): {shown(uri).rstrip('/')}/{exp_path}")
            return 0
    elif not os.path.exists(os.path.join(storage, L.MLFLOW_DB)):
        raise UserError(f"no MLflow database in {storage}")
    mlflow_bin = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    print(f"MLflow UI: http://{args.host}:{args.port}/{exp_path}   (Ctrl-C stops it)")
    cmd = [mlflow_bin, "server", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
           "--default-artifact-root", L.artifact_root(uri) or S.join(storage, L.ARTIFACTS)]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
