"""Work the driver hands to Ray as tasks with declared resources, so the driver can be a CPU-only head node and
Ray's resource accounting sees it: the reference statistics (once per sweep, before the first trial) and the
baseline evaluations. Each task gets the trials' accelerator when the trials have one; on CPU it gets the CPUs of
the local machine when p2sweep started the Ray itself, else one trial's CPUs."""
from __future__ import annotations

import os
import sys
import time


def task_options(cpu: float, gpu: float, whole_node: bool = False) -> dict:
    """Ray task options: one trial's resources (its CPUs, and its GPU share when trials use one), so the task fits
    wherever a trial fits and never waits for a whole node of a shared cluster. `whole_node`: a CPU sweep on the
    local Ray p2sweep started itself takes all of its CPUs (no trial runs yet, and nobody else shares it)."""
    import ray

    if gpu:
        return {"num_cpus": cpu, "num_gpus": gpu}
    if not whole_node:
        return {"num_cpus": cpu}
    node_cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return {"num_cpus": max([cpu] + node_cpus)}


def _threads(opts: dict) -> int:
    return max(1, int(opts.get("num_cpus", 1)))


def build_reference(base: dict, cache_dir: str, threads: int) -> dict:
    """The reference statistics of the sweep's dataset, once: into `cache_dir` when it is a path every node sees
    (under its file lock: one computation however many callers), or, when it is in object storage, into this
    node's own cache and then uploaded (found there, they are copied, not recomputed). Returns {computed, seconds,
    path (where the trials find them), node, gpus (the GPU ids Ray gave the task)}."""
    import torch

    from p2core.config import config_from_dict
    from p2core.data import load_dataset
    from p2core.evaluation import extractor_from_config, ref_cache_path, reference_stats
    from p2core.trainer import resolve_device

    from ..storage import fs as storage

    cfg = config_from_dict(base)
    torch.set_num_threads(threads)
    remote = storage.is_uri(cache_dir)
    local_cache = "" if remote else cache_dir  # "": this node's default cache
    dev = resolve_device(cfg.train.device)
    imgs, key = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels)
    ext = extractor_from_config(cfg.eval)
    path = ref_cache_path(local_cache, key, cfg.model.image_size, ext.name, cfg.eval.ref_samples)
    shared = storage.join(cache_dir, "refstats", os.path.basename(path)) if remote else path
    t0 = time.perf_counter()
    computed = []
    if remote:
        storage.fetch(shared, path)
    reference_stats(imgs, key, ext, image_size=cfg.model.image_size, ref_samples=cfg.eval.ref_samples,
                    cache_dir=local_cache, device=dev, batch_size=min(cfg.eval.batch_size, 128), progress=True,
                    on_compute=computed.append)
    if remote and not storage.exists(shared):
        storage.upload(path, shared)
    return {"computed": bool(computed), "seconds": time.perf_counter() - t0, "path": shared,
            "node": os.environ.get("RAY_NODE_ID", "") or __import__("socket").gethostname(),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def reference_as_task(base: dict, cache_dir: str, cpu: float, gpu: float, whole_node: bool = False) -> dict:
    """Run `build_reference` as a Ray task and wait for it (Ray must be initialised)."""
    import ray

    opts = task_options(cpu, gpu, whole_node)
    print(f"reference statistics: a Ray task with {opts} (cached in {cache_dir})", file=sys.stderr)
    t0 = time.perf_counter()
    out = task_result(ray.remote(build_reference).options(**opts).remote(base, cache_dir, _threads(opts)),
                      "the reference-statistics task")
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def task_result(ref, what: str):
    """ray.get, with a task's own error as one line: a UserError (bad storage settings on the node, say) keeps exit
    status 2; anything else says which task failed and why, after the remote traceback (for a bug report)."""
    import ray

    from p2core.errors import UserError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause.args[0] if cause.args else cause)) from None
        print(getattr(e, "traceback_str", ""), file=sys.stderr)  # the remote traceback, for a bug report
        msg = str(cause).splitlines()[0][:300] if cause is not None and str(cause) else type(cause).__name__
        raise UserError(f"{what} failed on a Ray node: {type(cause).__name__}: {msg}") from None
    except ray.exceptions.RayError as e:  # the worker or its node died (out of memory, say), a runtime_env failed
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise UserError(f"{what} failed on a Ray node: {type(e).__name__}: {msg}") from None


def baseline_runner(base: dict, cache_dir: str, ref_file: str, cpu: float, gpu: float, whole_node: bool = False):
    """A `run(b)` for `baselines.evaluate` that evaluates each baseline as a Ray task (with the sweep's reference
    statistics copied into the node's cache first when they live in object storage)."""
    import ray

    opts = task_options(cpu, gpu, whole_node)
    task = ray.remote(_baseline_task).options(**opts)
    return lambda b: task_result(task.remote(b, base, cache_dir, ref_file, _threads(opts)),
                                 f"the evaluation of baseline {b['name']!r}")


def _baseline_task(b: dict, base: dict, cache_dir: str, ref_file: str, threads: int):
    from ..storage import fs as storage
    from ..record.baselines import evaluate_one

    if storage.is_uri(cache_dir):
        fetch_reference(ref_file, "")
        cache_dir = ""
    return evaluate_one(b, base, cache_dir, threads)


def fetch_reference(ref_file: str, cache_dir: str = "") -> str:
    """Copy the sweep's reference statistics from the storage into this node's cache (`cache_dir`, "" = the node's
    default), where the evaluator looks for them (files are named by a content key: a trial whose data differ still
    computes its own). Returns "storage" (copied now), "cache" (already on this node) or "" (no file to copy)."""
    from p2core.data import default_cache_dir

    from ..storage import fs as storage

    if not ref_file:
        return ""
    return storage.fetch(ref_file, os.path.join(default_cache_dir(cache_dir), "refstats", storage.basename(ref_file)))
