"""Work the driver hands to Ray as tasks with declared resources, so the driver can be a CPU-only head node and
Ray's resource accounting sees it: the reference statistics (once per sweep, before the first trial) and the
baseline evaluations. Each task gets the trials' accelerator when the trials have one; on CPU it gets the CPUs of
the largest node (a local sweep: the whole machine, as the driver had before)."""
from __future__ import annotations

import os
import sys
import time


def task_options(cpu: float, gpu: float) -> dict:
    """Ray task options: one trial's GPU share and CPUs when trials use a GPU, else the largest node's CPUs."""
    import ray

    if gpu:
        return {"num_cpus": cpu, "num_gpus": gpu}
    node_cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return {"num_cpus": max([cpu] + node_cpus)}


def _threads(opts: dict) -> int:
    return max(1, int(opts.get("num_cpus", 1)))


def build_reference(base: dict, cache_dir: str, threads: int) -> dict:
    """The reference statistics of the sweep's dataset into `cache_dir` (under its file lock: one computation,
    however many callers); returns {computed, seconds, path, node}."""
    import torch

    from p2core.config import config_from_dict
    from p2core.data import load_dataset
    from p2core.evaluation import extractor_from_config, ref_cache_path, reference_stats
    from p2core.trainer import resolve_device

    cfg = config_from_dict(base)
    torch.set_num_threads(threads)
    dev = resolve_device(cfg.train.device)
    imgs, key = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels)
    ext = extractor_from_config(cfg.eval)
    path = ref_cache_path(cache_dir, key, cfg.model.image_size, ext.name, cfg.eval.ref_samples)
    had = os.path.exists(path)
    t0 = time.perf_counter()
    reference_stats(imgs, key, ext, image_size=cfg.model.image_size, ref_samples=cfg.eval.ref_samples,
                    cache_dir=cache_dir, device=dev, batch_size=min(cfg.eval.batch_size, 128), progress=True)
    return {"computed": not had, "seconds": time.perf_counter() - t0, "path": path,
            "node": os.environ.get("RAY_NODE_ID", "") or __import__("socket").gethostname()}


def reference_as_task(base: dict, cache_dir: str, cpu: float, gpu: float) -> dict:
    """Run `build_reference` as a Ray task and wait for it (Ray must be initialised)."""
    import ray

    opts = task_options(cpu, gpu)
    print(f"reference statistics: a Ray task with {opts} (cached in {cache_dir})", file=sys.stderr)
    t0 = time.perf_counter()
    out = ray.get(ray.remote(build_reference).options(**opts).remote(base, cache_dir, _threads(opts)))
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def baseline_runner(base: dict, cache_dir: str, cpu: float, gpu: float):
    """A `run(b)` for `baselines.evaluate` that evaluates each baseline as a Ray task."""
    import ray

    from .baselines import evaluate_one

    opts = task_options(cpu, gpu)
    task = ray.remote(evaluate_one).options(**opts)
    return lambda b: ray.get(task.remote(b, base, cache_dir, _threads(opts)))
