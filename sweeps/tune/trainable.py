"""The Ray Tune trainable: a thin adapter over the p2core Trainer (never a stand-in).

It reports only at evaluation points (which include every ASHA rung), one `TrialReport` each, with images seen as
ASHA's time attribute; each report carries the trainer's checkpoint, and a restarted trial continues from
`tune.get_checkpoint()`. A diverged trial reports metric = +inf with `diverged = 1` and returns (no retry).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from p2core.config import TrainingConfig

from ..record.replicate import trial_config
from ..record.trial_report import TrialReport
from ..storage import trial_files as TF


@dataclass
class TrialInfo:
    """What every trial of a sweep shares besides its own config (picklable, sent once with tune.with_parameters)."""
    metric: str
    rungs: list = field(default_factory=list)
    rung_metrics: dict = field(default_factory=dict)  # rung (images) -> its cheaper metric (multi-fidelity ASHA)
    cpu: float = 1.0
    cache_dir: str = ""   # the trials' eval.cache_dir ("" = the node's own default)
    ref_file: str = ""    # the sweep's reference statistics in the storage, copied into the cache before training
    ema_rule: str = "tracked"  # scheduler.ema_rule (`rung_candidates`)


def rung_candidates(rec: dict, rung_metric: str, sigma_rels, rule: str) -> dict:
    """scheduler.ema_rule best: {"tracked": v, "0.07": v, ...}, the judging metric of every EMA in this evaluation
    (the scheduler and the searcher choose one EMA per configuration from them); {} for the tracked rule."""
    from p2core.metrics import ema_name, with_ema

    if rule != "best":
        return {}
    out = {ema_name(None): rec.get(rung_metric)}
    out.update({ema_name(s): rec.get(with_ema(rung_metric, s)) for s in sigma_rels})
    return out


def run_config(base: dict, config: dict, info: TrialInfo) -> TrainingConfig:
    """The config one trial trains with: its validated training config (`record.replicate.trial_config`), the
    trial's CPUs as torch threads, the shared cache, the sweep metric."""
    cfg = trial_config(base, config)
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


def trial_working_dir() -> str:
    """The folder of this trial whose files Ray uploads to the trial's folder in the storage, from whichever node
    runs it (`SyncConfig(sync_artifacts=True)` -> `StorageContext.persist_artifacts`, at every checkpointed report
    and when the trial ends). Not `get_trial_dir()`: for a function trainable that is the driver's staging folder,
    which only the driver's own experiment sync uploads, so files written there on a worker node never leave it.
    (`get_storage()` is a Ray DeveloperAPI; tests/test_ray_trust.py checks that it still names this folder.)"""
    from ray import tune

    return tune.get_context().get_storage().trial_working_directory


def placement(device: str) -> dict:
    """{gpus, device} of this trial: the GPU ids Ray gave it (Ray sets CUDA_VISIBLE_DEVICES for what it places) and the
    torch device the trainer will use. A trial given a GPU that torch cannot see trains on CPU and says so once."""
    import sys

    from p2core.trainer import resolve_device

    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    dev = resolve_device(device).type
    if gpus and dev == "cpu":
        print(f"p2sweep: this trial was given GPU {gpus} by Ray (CUDA_VISIBLE_DEVICES={gpus}), but torch sees no CUDA "
              "device: training on CPU", file=sys.stderr)
    return {"gpus": gpus, "device": dev}


def copy_trial_files(src: str, dst: str) -> None:
    """The files a Tune checkpoint carries (trial_files.CARRIED), from one local `p2/` folder to another."""
    for name in TF.CARRIED:
        s = os.path.join(src, name)
        if os.path.isfile(s):
            os.makedirs(dst, exist_ok=True)
            shutil.copy2(s, os.path.join(dst, name))
        elif os.path.isdir(s):
            shutil.copytree(s, os.path.join(dst, name), dirs_exist_ok=True)


def snapshot_dir(working_dir: str) -> str:
    """Where a trial keeps its power-EMA snapshots on its node: beside its working directory, not in it (Ray's
    artifact sync uploads the whole working directory at every report, so N snapshots there would be uploaded
    N times over); each is uploaded once, when taken (`put_file`)."""
    return working_dir.rstrip("/") + "." + TF.SNAPSHOTS


def put_file(fs, local: str, remote: str, attempts: int = 3) -> None:
    """Upload `local` to `remote` on the pyarrow filesystem `fs`, retried (a transient storage error should not fail
    a trial), never leaving half a file under its real name: on a local filesystem under a temporary name that is
    then renamed; an object PUT is atomic already (and a server-side copy of a large snapshot is not free)."""
    import time

    import pyarrow.fs as pafs

    folder, name = remote.rsplit("/", 1)
    object_store = fs.type_name in ("s3", "gcs")
    for i in range(attempts):
        try:
            if not object_store:
                fs.create_dir(folder, recursive=True)
                tmp = f"{folder}/.tmp-{name}"
                pafs.copy_files(local, tmp, destination_filesystem=fs)
                fs.move(tmp, remote)
            else:
                pafs.copy_files(local, remote, destination_filesystem=fs)
            return
        except OSError:
            if i == attempts - 1:
                raise
            time.sleep(2 ** i)


def fetch_snapshots(fs, remote_p2: str, local: str) -> list[str]:
    """Copy the power-EMA snapshot files of the trial's `p2/` folder in the storage (`fs`, `remote_p2`: where each
    was uploaded when taken, by whichever node took it last) into `local`, replacing local copies (one left on this
    node by an abandoned attempt may differ); returns the names copied. A trial continued on another node or
    machine then reconstructs its EMAs from every snapshot, not only from those it takes after the restart (the
    trainer's resume then drops those after its checkpoint and names any that are still missing)."""
    import pyarrow.fs as pafs

    from p2core.atomic import atomic_write
    from p2core.phema import SNAPSHOT_NAME

    remote = f"{remote_p2.rstrip('/')}/{TF.SNAPSHOTS}"
    if fs.get_file_info(remote).type != pafs.FileType.Directory:
        return []
    got = []
    for info in fs.get_file_info(pafs.FileSelector(remote)):
        if not SNAPSHOT_NAME.match(info.base_name):
            continue
        os.makedirs(local, exist_ok=True)
        with fs.open_input_stream(info.path) as src:  # atomically: a half-copied file is never a snapshot
            atomic_write(os.path.join(local, info.base_name), lambda f: f.write(src.read()))
        got.append(info.base_name)
    return sorted(got)


def run_trial(config: dict, base: dict, info: TrialInfo) -> None:
    import ray
    import torch
    from ray import tune

    from p2core.checkpoint import atomic_torch_save
    from p2core.errors import Diverged
    from p2core.metrics import judged_on
    from p2core.trainer import Trainer

    cfg = run_config(base, config, info)
    torch.set_num_threads(cfg.train.num_threads)
    # "Checkpoint successfully created at: ..." at every report reaches the driver's console otherwise
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    work = trial_working_dir()
    out_dir, snaps = os.path.join(work, TF.P2), snapshot_dir(work)
    node_ip = ray.util.get_node_ip_address()  # 127.0.0.1 for the embedded local Ray (tests check it)
    node = node_label()
    # where this trial's reference statistics came from, reported with every result (a sweep computes them once)
    from .driver_tasks import fetch_reference

    ref = {"source": fetch_reference(info.ref_file, cfg.eval.cache_dir) or "cache"}
    placed = placement(cfg.train.device)
    pending_log: list = []

    def trial_storage():
        from .. import compat

        fs, remote = compat.trial_storage_folder(tune.get_context().get_storage())
        return fs, f"{remote}/{TF.P2}"

    class Hooks:
        def on_snapshot(self, trainer, path):  # uploaded before the checkpoint that lists it is reported
            fs, remote = trial_storage()
            put_file(fs, path, f"{remote}/{TF.SNAPSHOTS}/{os.path.basename(path)}")

        def on_log(self, trainer, rec):
            pending_log.append({k: v for k, v in rec.items() if k != "kind"})

        def on_eval(self, trainer, rec):
            evals = {k: v for k, v in rec.items() if k not in ("images_seen", "final", "kind", "points")}
            # a report answering a low rung is judged on that rung's metric (the highest such rung it answers)
            rung_metric = judged_on(rec.get("points", []), trainer.point_metrics, info.metric)
            if trainer.evaluator is not None and trainer.evaluator.ref_computed:
                ref["source"] = "computed by the trial"
            rep = TrialReport.make(info.metric, rec.get(info.metric), trainer.images_seen,
                                   evaluated=info.metric in rec, rung_metric=rung_metric,
                                   rung_value=rec.get(rung_metric), final=bool(rec.get("final")),
                                   rung_candidates=rung_candidates(rec, rung_metric, cfg.eval.ema_sigma_rels,
                                                                   info.ema_rule),
                                   evals=evals, train_log=list(pending_log), node_ip=node_ip, node=node,
                                   reference=ref["source"], **placed)
            pending_log.clear()
            # The trainer's state goes straight into the Tune checkpoint (Tune keeps the best by the metric and the
            # latest); the trial directory holds no trainer checkpoints that Ray would sync and never prune.
            with tempfile.TemporaryDirectory() as d:
                atomic_torch_save(trainer.state(), os.path.join(d, "trainer.pt"))
                # the trial's own files ride in the checkpoint: a retried or resumed trial, on any node, continues
                # one metrics.jsonl and keeps its earlier sample grids
                copy_trial_files(out_dir, os.path.join(d, TF.IN_CHECKPOINT))
                tune.report(rep.to_result(), checkpoint=tune.Checkpoint.from_directory(d))

    def make_trainer(resume_from=None):
        return Trainer.from_config(cfg, out_dir, hooks=Hooks(), extra_eval_points=info.rungs,
                                   point_metrics={r: [m] for r, m in info.rung_metrics.items()}, progress=False,
                                   resume_from=resume_from, own_checkpoints=False, snapshot_dir=snaps)

    ck = tune.get_checkpoint()
    if ck is not None:  # a retried or resumed trial continues from its last reported checkpoint
        with ck.as_directory() as d:
            copy_trial_files(os.path.join(d, TF.IN_CHECKPOINT), out_dir)
            if cfg.train.ema.type == "power":  # snapshots are not in checkpoints: each is in the storage
                fetch_snapshots(*trial_storage(), snaps)
            trainer = make_trainer(os.path.join(d, "trainer.pt"))
    else:
        trainer = make_trainer()
    # each snapshot was uploaded to the storage when taken: the node's copies go when the trial ends (Ray's session
    # folder keeps them otherwise, 375 MB per snapshot for the paper config), also when Tune stops it (ASHA, a
    # budget: Ray's report then raises SystemExit in this thread; best effort, as Ray may tear the actor down
    # first); a trial that raised keeps them, for a retry on this node if an upload failed
    ended = False
    try:
        trainer.run()
        ended = True
    except Diverged as e:
        ended = True
        rep = TrialReport.make(info.metric, float("inf"), e.images_seen, final=True, diverged=True,
                               diverged_reason=str(e), train_log=list(pending_log), node_ip=node_ip, node=node,
                               reference=ref["source"], **placed)
        tune.report(rep.to_result())
    except SystemExit:
        ended = True
        raise
    finally:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if ended:
            shutil.rmtree(snaps, ignore_errors=True)
