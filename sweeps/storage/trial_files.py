"""A trial's own files, one home for their layout (no Ray import). The trainer writes them under `p2/` in the
trial's working directory; Ray copies that folder to the trial's folder in the storage
(`<storage>/<sweep>/<trial>/p2/`), from whichever node ran it:

    p2/metrics.jsonl   the trainer's records (only appended to: a longer one is a newer one)
    p2/config.yaml     the trial's training config          p2/loss.png   its loss curves
    p2/samples/        sample grids (grid_<images>.png)      p2/ema_snapshots/   power-EMA snapshots

A Tune checkpoint carries `metrics.jsonl` and `samples/` (in its `p2_files/`), so that a trial retried or resumed
on another node continues one `metrics.jsonl` and keeps its earlier grids; MLflow gets `RUN_FILES` and the grids.
"""
from __future__ import annotations

from . import fs as S

P2 = "p2"                       # the trainer's out_dir inside a trial's folder
METRICS = "metrics.jsonl"
SAMPLES = "samples"
SNAPSHOTS = "ema_snapshots"
RUN_FILES = ("config.yaml", "loss.png", METRICS)  # and samples/*: what a trial's MLflow run holds
CARRIED = (METRICS, SAMPLES)    # what rides in a Tune checkpoint
IN_CHECKPOINT = "p2_files"      # their folder in the checkpoint


def files_dir(trial_dir: str) -> str:
    """`<trial_dir>/p2` (a local path or a storage URI)."""
    return S.join(trial_dir, P2)


def samples_dir(trial_dir: str) -> str:
    return S.join(trial_dir, P2, SAMPLES)


def snapshots_dir(trial_dir: str) -> str:
    return S.join(trial_dir, P2, SNAPSHOTS)


def metrics_size(trial_dir: str) -> int:
    """The size of the trial's `metrics.jsonl` (-1 when absent): which of two copies is newer."""
    return S.file_sizes(files_dir(trial_dir)).get(METRICS, -1)


def run_file_sizes(trial_dir: str) -> dict:
    """{"metrics.jsonl": size, "samples/grid_...png": size, ...}: the files of the trial that its run holds."""
    out = {k: v for k, v in S.file_sizes(files_dir(trial_dir)).items() if k in RUN_FILES}
    out.update({f"{SAMPLES}/{k}": v for k, v in S.file_sizes(samples_dir(trial_dir)).items()})
    return out
