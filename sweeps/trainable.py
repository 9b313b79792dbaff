"""The Ray Tune trainable: a thin adapter over the p2core Trainer (never a stand-in).

It reports only at evaluation points (which include every ASHA rung), with the sweep metric in every report and
images seen as ASHA's time attribute; each report carries the trainer's checkpoint, and a restarted trial continues
from `tune.get_checkpoint()`. A diverged trial reports metric = +inf with `diverged = 1` and returns (no retry).
"""
from __future__ import annotations

import json
import math
import os
import tempfile


def run_trial(config: dict, base: dict, info: dict) -> None:
    import ray
    import torch
    from ray import tune

    from p2core.checkpoint import atomic_torch_save
    from p2core.config import apply_overrides, config_from_dict
    from p2core.errors import Diverged
    from p2core.trainer import Trainer

    overrides = dict(config)
    data = apply_overrides(base, overrides)
    data.setdefault("train", {})["num_threads"] = max(1, int(info["cpu"]))
    data["eval"]["cache_dir"] = info["cache_dir"]
    cfg = config_from_dict(data)
    torch.set_num_threads(cfg.train.num_threads)
    out_dir = os.path.join(tune.get_context().get_trial_dir(), "p2")
    metric = info["metric"]
    node_ip = ray.util.get_node_ip_address()  # 127.0.0.1 for the embedded local Ray (tests check it)
    state = {"last_logged": 0, "last_metric": None, "evals": {}}
    pending_log: list = []

    class Hooks:
        def on_log(self, trainer, rec):
            pending_log.append({k: v for k, v in rec.items() if k != "kind"})

        def on_eval(self, trainer, rec):
            scores = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("images_seen", "final")}
            state["evals"].update(scores)
            if metric in rec:
                state["last_metric"] = rec[metric]
            report = {metric: state["last_metric"], "images_seen": trainer.images_seen, "diverged": 0,
                      "final": int(bool(rec.get("final"))), "train_log": json.dumps(pending_log),
                      "node_ip": node_ip, **scores}
            if pending_log:
                report["loss"] = pending_log[-1]["loss"]
            pending_log.clear()
            # The trainer's state goes straight into the Tune checkpoint (kept num_to_keep deep by Tune); the trial
            # directory holds no trainer checkpoints that Ray would sync to storage and never prune.
            with tempfile.TemporaryDirectory() as d:
                atomic_torch_save(trainer.state(), os.path.join(d, "trainer.pt"))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    def make_trainer(resume_from=None):
        return Trainer(cfg, out_dir, hooks=Hooks(), extra_eval_points=info["rungs"], progress=False,
                       resume_from=resume_from, own_checkpoints=False)

    ck = tune.get_checkpoint()
    if ck is not None:  # a retried or resumed trial continues from its last reported checkpoint
        with ck.as_directory() as d:
            trainer = make_trainer(os.path.join(d, "trainer.pt"))
    else:
        trainer = make_trainer()
    try:
        trainer.run()
    except Diverged as e:
        tune.report({metric: math.inf, "images_seen": e.images_seen, "diverged": 1, "final": 1,
                     "diverged_reason": str(e), "train_log": json.dumps(pending_log)})
    finally:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
