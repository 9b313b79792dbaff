"""Timing helpers shared by the benchmarks: device sync, one timed call, alternating rounds with medians."""
import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Seconds of one call of `fn`, with the device's queued work done before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict, device, rounds: int, warmup: bool = True) -> dict:
    """Median seconds of each function, calling them in turn `rounds` times (after one warm-up call each), so that
    a drift of the machine hits every side alike."""
    if warmup:
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}
