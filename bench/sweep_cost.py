"""What the paper's study costs three ways, on Fashion-MNIST at CPU size; prints one JSON line.

The study: p2_gamma {0, 0.5, 1} x noise_schedule {linear, cosine} x sampling steps {ddim10, ddim25, ddim50}, the
CPU preset trained to `--total-images`, ranked on KID of `--num-samples` samples (NVIDIA's Inception).

  (a) naive: every (configuration, steps) trained to the end on its own, with its own evaluation and its own
      reference statistics. Computed from (b)'s logs, not run: the same trainings, counted once per steps value.
  (b) p2sweep, no early stopping: one training per configuration, every steps value scored at the end from the same
      weights, reference statistics computed once and shared.
  (c) p2sweep with ASHA and a multi-fidelity rung: the rung at a third of training judged on KID of
      `--rung-samples` samples at DDIM-10, the end on the sweep metric.

Costs: images trained, image-steps generated (images x sampling steps), images through Inception (generated +
reference), and seconds (sweep wall time, and the sum of trial times; the shared reference statistics added once to
(b) and (c), once per run to (a)). Also: whether (c) picks the winner of (a)/(b), and the Spearman rank correlation
between the cheap rung metric (c) and the sweep metric at the end (b) over the same configurations (training is
deterministic in the seed, so (c)'s trials up to the rung are (b)'s).

With `--ema`, the EMA dimension instead: a power EMA (profiles 0.05 and 0.10, 0.10 evaluated during training) and
the EMA values {0.05, 0.10, 0.20}, on the same study without early stopping:

  naive: one training per (configuration, EMA value), each scoring every steps value with its own reference.
      Computed from (d)'s logs (its EMAs' evaluation times), not run.
  (d) p2sweep, every EMA scored fully (eval.ema_sigma_rels [0.05, 0.20]): one training per configuration.
  (e) p2sweep, the cheap path (eval.ema_choose_on kid<rung-samples>_ddim10): every EMA scored on the cheap metric,
      the point's metrics for the one it ranks first only.

Also: the share of trial seconds spent on post-hoc EMAs (`ema_eval_share`), whether (e) picks the winner (config,
steps, EMA) of naive/(d), whether the tracked EMA alone would have, and how far (e)'s chosen values are from (d)'s
values of the same EMA (the same trainings and noise).

  python bench/sweep_cost.py [--total-images 9000] [--num-samples 128] [--rung-samples 64] [--ref-samples 500] [--ema]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402

SPECS = ["ddim10", "ddim25", "ddim50"]
SPACE = {"diffusion.p2_gamma": {"grid": [0.0, 0.5, 1.0]}, "diffusion.noise_schedule": {"grid": ["linear", "cosine"]}}


from sweeps.results.cost import (chosen_against_full, naive_cost, naive_ema_cost, read_trials,  # noqa: E402
                                 rung_vs_end, same_choice, strategy_cost, winner)
from p2core.metrics import CHOSEN  # noqa: E402


# -- running the two sweeps ----------------------------------------------------------------------------------

TRACKED_SIGMA_REL, EMA_SIGMA_RELS = 0.10, [0.05, 0.20]  # the EMA dimension: {0.05, 0.10 (tracked), 0.20}


def ema_overrides(a, cheap_path: bool) -> dict:
    """A power EMA tracking 0.05 and 0.10 (0.10 evaluated), about 30 snapshots; the other two values post hoc."""
    every = max(32, a.total_images // 30 // 32 * 32)
    o = {"train.ema.type": "power", "train.ema.sigma_rels": [0.05, TRACKED_SIGMA_REL],
         "train.ema.snapshot_every_images": every, "eval.ema_sigma_rels": EMA_SIGMA_RELS}
    if cheap_path:
        o["eval.ema_choose_on"] = f"kid{a.rung_samples}_ddim10"
    return o


def sweep_file(tmp, name, a, asha: bool, extra: dict | None = None) -> str:
    d = {"name": name, "base": os.path.join(ROOT, "configs", "fmnist_cpu.yaml"),
         "overrides": {"train.total_images": a.total_images, "train.batch_size": 32, "train.lr": 5.0e-4,
                       "train.ema_rate": 0.99, "train.ema_warmup": True, "train.eval_every_images": 0,
                       "train.grid_samples": 0, "train.log_every_images": 1024, "eval.num_samples": a.num_samples,
                       "eval.sampling_steps": SPECS, "eval.ref_samples": a.ref_samples, "eval.batch_size": 128,
                       "eval.metrics": ["kid"], **(extra or {})},
         "metric": f"kid{a.num_samples}_ddim10", "space": SPACE,
         "search": {"algorithm": "grid", "max_concurrent": 2}, "seeds": [0], "resources": {"cpu": 1},
         "tracking": {"cache_dir": os.path.join(tmp, "cache")},
         "scheduler": ({"type": "asha", "grace_period_images": a.total_images // 3, "reduction_factor": 3,
                        "rung_metrics": [f"kid{a.rung_samples}_ddim10"]} if asha else {"type": "none"})}
    p = os.path.join(tmp, f"{name}.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(d, f)
    return p


def reference_seconds(tmp, a) -> float:
    """Compute (and cache, for both sweeps) the reference statistics; their time is counted per strategy."""
    from p2core.config import load_config
    from p2core.data import load_dataset
    from p2core.evaluation import extractor_from_config, reference_stats

    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_cpu.yaml"),
                      overrides={"eval.ref_samples": a.ref_samples, "eval.cache_dir": os.path.join(tmp, "cache")})
    images, dkey = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels)
    t0 = time.perf_counter()
    reference_stats(images, dkey, extractor_from_config(cfg.eval), image_size=cfg.model.image_size,
                    ref_samples=a.ref_samples, cache_dir=cfg.eval.cache_dir, batch_size=128)
    return time.perf_counter() - t0


def run_sweep(path, storage, env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", path, "--storage", storage], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"sweep {path} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def ema_dimension(tmp, a, env, ref_s) -> dict:
    """(d) every EMA scored fully and (e) the cheap path, both without early stopping; naive from (d)'s logs."""
    wall_d = run_sweep(sweep_file(tmp, "emafull", a, False, ema_overrides(a, False)), os.path.join(tmp, "d"), env)
    wall_e = run_sweep(sweep_file(tmp, "emacheap", a, False, ema_overrides(a, True)), os.path.join(tmp, "e"), env)
    full, cheap = read_trials(os.path.join(tmp, "d", "emafull")), read_trials(os.path.join(tmp, "e", "emacheap"))
    naive = naive_ema_cost(full, SPECS, EMA_SIGMA_RELS, a.num_samples, a.ref_samples, ref_s)
    cost_d = {**strategy_cost(full, a.ref_samples, ref_s), "wall_seconds": round(wall_d + ref_s, 1)}
    cost_e = {**strategy_cost(cheap, a.ref_samples, ref_s), "wall_seconds": round(wall_e + ref_s, 1)}
    kind_n = f"kid{a.num_samples}"
    w_naive = winner(full, kind_n, SPECS, (None, *EMA_SIGMA_RELS))  # the same values as separate trainings'
    w_tracked = winner(cheap, kind_n, SPECS)
    w_cheap = winner(cheap, kind_n, SPECS, (None, CHOSEN))
    out = {"scale": {"total_images": a.total_images, "num_samples": a.num_samples, "rung_samples": a.rung_samples,
                     "ref_samples": a.ref_samples, "configs": len(full), "specs": SPECS,
                     "emas": [TRACKED_SIGMA_REL, *EMA_SIGMA_RELS], "choose_on": f"kid{a.rung_samples}_ddim10"},
           "reference_seconds": round(ref_s, 1), "naive_one_training_per_ema": naive, "d_every_ema_scored": cost_d,
           "e_cheap_path": cost_e}
    for d in (naive, cost_d, cost_e):
        d["trial_seconds"] = round(d["trial_seconds"], 1)
        if "ema_eval_seconds" in d:
            d["ema_eval_seconds"] = round(d["ema_eval_seconds"], 1)
            d["ema_eval_share"] = round(d["ema_eval_seconds"] / d["trial_seconds"], 3)
    for k in ("images_trained", "image_steps_generated", "images_featurised", "trial_seconds"):
        out[f"naive_over_e_{k}"] = ratio(naive[k], cost_e[k])
        out[f"d_over_e_{k}"] = ratio(cost_d[k], cost_e[k])
    show = lambda w: {"params": dict(w[0]), "spec": w[1], "ema": w[2] if w[2] is not None else TRACKED_SIGMA_REL,
                      "value": w[3]} if w else None  # noqa: E731
    out.update(winner_naive=show(w_naive), winner_cheap_path=show(w_cheap), winner_tracked_only=show(w_tracked),
               cheap_path_same_winner=same_choice(w_naive, w_cheap, TRACKED_SIGMA_REL),
               tracked_only_same_winner=same_choice(w_naive, w_tracked, TRACKED_SIGMA_REL),
               chosen_vs_full_max_abs_diff=chosen_against_full(cheap, full, kind_n, SPECS, TRACKED_SIGMA_REL))
    return out


def ratio(a, b):
    return round(a / b, 2) if b else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-images", type=int, default=9000)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--rung-samples", type=int, default=64)
    ap.add_argument("--ref-samples", type=int, default=500)
    ap.add_argument("--keep", default="", help="keep the two sweeps' storage here")
    ap.add_argument("--ema", action="store_true", help="the EMA dimension instead (see the module docstring)")
    a = ap.parse_args()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=ROOT)
    tmp = a.keep or tempfile.mkdtemp(prefix="p2cost-")
    os.makedirs(tmp, exist_ok=True)
    ref_s = reference_seconds(tmp, a)
    if a.ema:
        return print(json.dumps(ema_dimension(tmp, a, env, ref_s)))
    wall_b = run_sweep(sweep_file(tmp, "full", a, asha=False), os.path.join(tmp, "b"), env)
    wall_c = run_sweep(sweep_file(tmp, "asha", a, asha=True), os.path.join(tmp, "c"), env)
    full, asha = read_trials(os.path.join(tmp, "b", "full")), read_trials(os.path.join(tmp, "c", "asha"))
    cost_a = naive_cost(full, SPECS, a.num_samples, a.ref_samples, ref_s)
    cost_b = {**strategy_cost(full, a.ref_samples, ref_s), "wall_seconds": round(wall_b + ref_s, 1)}
    cost_c = {**strategy_cost(asha, a.ref_samples, ref_s), "wall_seconds": round(wall_c + ref_s, 1)}
    kind_n = f"kid{a.num_samples}"
    w_b, w_c = winner(full, kind_n, SPECS), winner(asha, kind_n, SPECS)  # (params, spec, ema None, value)
    out = {"scale": {"total_images": a.total_images, "num_samples": a.num_samples, "rung_samples": a.rung_samples,
                     "ref_samples": a.ref_samples, "configs": len(full), "specs": SPECS},
           "reference_seconds": round(ref_s, 1), "a_naive": cost_a, "b_p2sweep": cost_b, "c_p2sweep_asha": cost_c}
    for k in ("images_trained", "image_steps_generated", "images_featurised", "trial_seconds"):
        out[f"a_over_c_{k}"] = ratio(cost_a[k], cost_c[k])
        out[f"b_over_c_{k}"] = ratio(cost_b[k], cost_c[k])
    out["winner_a_b"] = {"params": dict(w_b[0]), "spec": w_b[1], "value": w_b[3]} if w_b else None
    out["winner_c"] = {"params": dict(w_c[0]), "spec": w_c[1], "value": w_c[3]} if w_c else None
    out["same_winner"] = bool(w_b and w_c and w_b[:2] == w_c[:2])
    out["rung_vs_end"] = rung_vs_end(asha, full, f"kid{a.rung_samples}_ddim10", f"{kind_n}_ddim10")
    for d in (cost_a, cost_b, cost_c):
        d["trial_seconds"] = round(d["trial_seconds"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
