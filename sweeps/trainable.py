"""The Ray Tune trainable: a thin adapter over the p2core Trainer (never a stand-in).

It reports only at evaluation points (which include every ASHA rung), one `TrialReport` each, with images seen as
ASHA's time attribute; each report carries the trainer's checkpoint, and a restarted trial continues from
`tune.get_checkpoint()`. A diverged trial reports metric = +inf with `diverged = 1` and returns (no retry).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from p2core.config import TrainingConfig, apply_overrides, config_from_dict

from .report import GROUP_KEY, TrialReport


@dataclass
class TrialInfo:
    """What every trial of a sweep shares besides its own config (picklable, sent once with tune.with_parameters)."""
    metric: str
    rungs: list = field(default_factory=list)
    rung_metrics: dict = field(default_factory=dict)  # rung (images) -> its cheaper metric (multi-fidelity ASHA)
    cpu: float = 1.0
    cache_dir: str = ""   # the trials' eval.cache_dir ("" = the node's own default)
    ref_file: str = ""    # the sweep's reference statistics in the storage, copied into the cache before training


def trial_config(base: dict, config: dict, info: TrialInfo) -> TrainingConfig:
    """The validated training config of one trial: the sweep's validated base, the trial's values on top (the
    group key is bookkeeping, not a config value), the trial's CPUs as torch threads, the shared cache."""
    overrides = {k: v for k, v in config.items() if k != GROUP_KEY}
    cfg = config_from_dict(apply_overrides(base, overrides))
    cfg.train.num_threads = max(1, int(info.cpu))
    if info.cache_dir:
        cfg.eval.cache_dir = info.cache_dir
    cfg.metric = info.metric
    return cfg


def node_label() -> str:
    """This Ray node as `status` shows it: its --node-name where one was given, else the start of its node id
    (every node of a one-machine cluster has the same IP)."""
    import ray

    nid = ray.get_runtime_context().get_node_id()
    try:
        me = next(n for n in ray.nodes() if n.get("NodeID") == nid)
        name = me.get("NodeName") or ""
        if name and name != me.get("NodeManagerAddress"):
            return name
    except Exception:  # the id alone still tells nodes apart
        pass
    return nid[:8]


FILES = "p2_files"  # in a Tune checkpoint: the trial's metrics.jsonl and sample grids as of that report


def copy_trial_files(src: str, dst: str) -> None:
    import shutil

    for name in ("metrics.jsonl", "samples"):
        s = os.path.join(src, name)
        if os.path.isfile(s):
            os.makedirs(dst, exist_ok=True)
            shutil.copy2(s, os.path.join(dst, name))
        elif os.path.isdir(s):
            shutil.copytree(s, os.path.join(dst, name), dirs_exist_ok=True)


def run_trial(config: dict, base: dict, info: TrialInfo) -> None:
    import ray
    import torch
    from ray import tune

    from p2core.checkpoint import atomic_torch_save
    from p2core.errors import Diverged
    from p2core.trainer import Trainer

    cfg = trial_config(base, config, info)
    torch.set_num_threads(cfg.train.num_threads)
    out_dir = os.path.join(tune.get_context().get_trial_dir(), "p2")
    node_ip = ray.util.get_node_ip_address()  # 127.0.0.1 for the embedded local Ray (tests check it)
    node = node_label()
    # where this trial's reference statistics came from, reported with every result (a sweep computes them once)
    from .driver_tasks import fetch_reference

    ref = {"source": fetch_reference(info.ref_file, cfg.eval.cache_dir) or "cache"}
    pending_log: list = []

    class Hooks:
        def on_log(self, trainer, rec):
            pending_log.append({k: v for k, v in rec.items() if k != "kind"})

        def on_eval(self, trainer, rec):
            evals = {k: v for k, v in rec.items() if k not in ("images_seen", "final", "kind", "points")}
            # a report answering a low rung is judged on that rung's metric (the highest such rung it answers)
            low = [p for p in rec.get("points", []) if p in info.rung_metrics]
            rung_metric = info.rung_metrics[max(low)] if low else info.metric
            if trainer.evaluator is not None and trainer.evaluator.ref_computed:
                ref["source"] = "computed by the trial"
            rep = TrialReport.make(info.metric, rec.get(info.metric), trainer.images_seen,
                                   evaluated=info.metric in rec, rung_metric=rung_metric,
                                   rung_value=rec.get(rung_metric), final=bool(rec.get("final")),
                                   evals=evals, train_log=list(pending_log), node_ip=node_ip, node=node,
                                   reference=ref["source"])
            pending_log.clear()
            # The trainer's state goes straight into the Tune checkpoint (Tune keeps the best by the metric and the
            # latest); the trial directory holds no trainer checkpoints that Ray would sync and never prune.
            with tempfile.TemporaryDirectory() as d:
                atomic_torch_save(trainer.state(), os.path.join(d, "trainer.pt"))
                # the trial's own files ride in the checkpoint: a retried or resumed trial, on any node, continues
                # one metrics.jsonl and keeps its earlier sample grids
                copy_trial_files(out_dir, os.path.join(d, FILES))
                tune.report(rep.to_result(), checkpoint=tune.Checkpoint.from_directory(d))

    def make_trainer(resume_from=None):
        return Trainer(cfg, out_dir, hooks=Hooks(), extra_eval_points=info.rungs,
                       point_metrics={r: [m] for r, m in info.rung_metrics.items()}, progress=False,
                       resume_from=resume_from, own_checkpoints=False)

    ck = tune.get_checkpoint()
    if ck is not None:  # a retried or resumed trial continues from its last reported checkpoint
        with ck.as_directory() as d:
            copy_trial_files(os.path.join(d, FILES), out_dir)
            trainer = make_trainer(os.path.join(d, "trainer.pt"))
    else:
        trainer = make_trainer()
    try:
        trainer.run()
    except Diverged as e:
        rep = TrialReport.make(info.metric, float("inf"), e.images_seen, final=True, diverged=True,
                               diverged_reason=str(e), train_log=list(pending_log), node_ip=node_ip, node=node,
                               reference=ref["source"])
        tune.report(rep.to_result())
    finally:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
