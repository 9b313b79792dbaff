"""The comparison view `p2sweep ui` opens: the trials flat, in the one ranking's order (`p2sweep_rank`), with the
swept parameters and the metrics as columns (the UI's saved-view format: sweeps.compat)."""
from __future__ import annotations

import json
import time

from .. import compat
from ..record.replicate import SEED_KEY, Replicate
from .runs import REPLICATE, ROLE

VIEW_KEY = "p2sweep"  # the saved view's key (compat.shared_view_tag, compat.runs_page)


def compare_view_state(metric: str, params: list, metrics: list, order_by: str = "") -> dict:
    """The runs-page state (MLflow 3.x UI) of a sweep's comparison: its trials flat (a filter on the trial tag; sorting
    by a metric is what lists child runs flat instead of folded under the parent), sorted by `order_by` (a metric,
    default `metric`), smallest first, with the swept parameters, the seed and the metrics as columns, every run in
    charts."""
    col = compat.ui_column
    cols = ([col("params", p) for p in params] + [col("params", SEED_KEY)] +
            [col("metrics", m) for m in metrics])
    return compat.runs_page_state(f"tags.`{ROLE}` = 'trial'", col("metrics", order_by or metric), cols)


def set_compare_view(c, experiment_id: str, metric: str, params: list, metrics: list, name: str = "",
                     order_by: str = "") -> str:
    """Write the view as the experiment tag the runs page loads from `?viewStateShareKey=p2sweep`; returns the page's
    address path. Stored as the UI's own saved-view envelope ({name, createdAt, state}), so it is listed among the
    experiment's saved views too."""
    state = json.dumps(compare_view_state(metric, params, metrics, order_by))
    value = compat.saved_view_envelope(name or f"p2sweep: trials by {metric}", state, int(time.time() * 1000))
    if len(value) > compat.EXPERIMENT_TAG_VALUE_LIMIT:  # the tracking store's tag-value limit
        raise ValueError(f"view state of {len(value)} characters is over MLflow's "
                         f"{compat.EXPERIMENT_TAG_VALUE_LIMIT:,}")
    c.set_experiment_tag(experiment_id, compat.shared_view_tag(VIEW_KEY), value)
    return compat.runs_page(experiment_id, VIEW_KEY)


def view_columns(meta, trials) -> tuple[list, list]:
    """(swept parameters, metric names): the sweep metric's family (one per sampling spec) first, then the other
    metrics the trials evaluated (FID beside KID, rung metrics)."""
    from p2core.metrics import is_metric_name, split_ema

    from ..results.analysis import family

    params = sorted(meta.spec.space)
    fam = family(trials, meta.metric) or [meta.metric]
    other = sorted({k for t in trials for ev in t.points.values() for k in ev if is_metric_name(split_ema(k)[0])}
                   - set(fam))
    return params, fam + other

RANK = "p2sweep_rank"  # a trial run's metric: its configuration's place in the sweep's one ranking (1 = best)


def log_ranks(c, experiment_id: str, meta, trials) -> int:
    """Give every trial run the place of its configuration in `results.ranked_configs` (the ranking `best`,
    `compare` and the report show) as the metric `p2sweep_rank`, so the view lists configurations in that order
    rather than by each run's own last value. Runs whose configuration has no ranked row get none. Returns how many
    runs were given one."""
    from mlflow.entities import Metric

    from ..results import trials as R

    runs = {r.data.tags.get(REPLICATE): r.info.run_id for r in c.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{meta.parent_run_id}'", max_results=10000)
        if r.data.tags.get(ROLE) == "trial"}
    place = {k: i + 1 for i, k in enumerate(R.ranked_configs(trials, meta.metric, meta.max_images, len(meta.seeds)))}
    ts, done = int(time.time() * 1000), set()
    for t in trials:
        rid, k = runs.get(Replicate.of(t.config).key), t.config_key
        if rid and k in place and rid not in done:  # a retried seed: one run, one rank
            c.log_batch(rid, metrics=[Metric(RANK, float(place[k]), ts, 0)])
            done.add(rid)
    return len(done)


def set_sweep_view(c, experiment_id: str, meta, trials) -> str:
    """The sweep's comparison view, configurations in the one ranking's order (`log_ranks`), best first."""
    params, metrics = view_columns(meta, trials)
    ranked = log_ranks(c, experiment_id, meta, trials) > 0
    return set_compare_view(c, experiment_id, meta.metric, params, ([RANK] if ranked else []) + metrics,
                            order_by=RANK if ranked else "")
