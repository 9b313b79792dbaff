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

  python bench/sweep_cost.py [--total-images 9000] [--num-samples 128] [--rung-samples 64] [--ref-samples 500]
"""
from __future__ import annotations

import argparse
import glob
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


from sweeps.results.analysis import steps_of  # noqa: E402  (the report's own count of image-steps)


# -- reading a sweep's results ----------------------------------------------------------------------------------

def read_trials(exp_dir: str) -> list[dict]:
    """[{params, rows}] per trial: `rows` = its reports (a later report at the same image count wins)."""
    out = []
    for rj in sorted(glob.glob(os.path.join(exp_dir, "*", "result.json"))):
        by_point = {}
        with open(rj) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    by_point[r["images_seen"]] = r
        if by_point:
            rows = [by_point[k] for k in sorted(by_point)]
            params = {k: v for k, v in rows[0]["config"].items() if k not in ("p2sweep_group", "train.seed")}
            out.append({"params": params, "rows": rows})
    return out


def key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def gen_of(row: dict) -> dict:
    """{spec: images generated} of one report."""
    return {k[len("gen_images_"):]: int(v) for k, v in row.items() if k.startswith("gen_images_")}


def train_seconds(trial: dict) -> float:
    last = trial["rows"][-1]
    return float(last.get("time_total_s", 0.0)) - sum(float(r.get("eval_seconds", 0.0)) for r in trial["rows"])


# -- the three costs (pure: the tests check these counts) -------------------------------------------------------

def strategy_cost(trials: list[dict], ref_samples: int, ref_seconds: float = 0.0) -> dict:
    """Cost of a p2sweep run from its trials' reports; reference statistics counted once."""
    c = {"images_trained": 0, "image_steps_generated": 0, "images_featurised": ref_samples,
         "trial_seconds": ref_seconds}
    for t in trials:
        c["images_trained"] += int(t["rows"][-1]["images_seen"])
        c["trial_seconds"] += float(t["rows"][-1].get("time_total_s", 0.0))
        for r in t["rows"]:
            for spec, n in gen_of(r).items():
                c["image_steps_generated"] += n * steps_of(spec)
                c["images_featurised"] += n
    return c


def naive_cost(full: list[dict], specs, num_samples: int, ref_samples: int, ref_seconds: float = 0.0) -> dict:
    """Cost of training every (configuration, steps) on its own, from the trials of a run without early stopping:
    per pair, the configuration's training, one evaluation of `num_samples` at that spec, its own reference."""
    c = {"images_trained": 0, "image_steps_generated": 0, "images_featurised": 0, "trial_seconds": 0.0}
    for t in full:
        last = t["rows"][-1]
        for spec in specs:
            c["images_trained"] += int(last["images_seen"])
            c["image_steps_generated"] += num_samples * steps_of(spec)
            c["images_featurised"] += num_samples + ref_samples
            c["trial_seconds"] += (train_seconds(t) + float(last.get(f"gen_seconds_{spec}", 0.0))
                                   + float(last.get(f"feat_seconds_{spec}", 0.0)) + ref_seconds)
    return c


def winner(trials: list[dict], kind_n: str, specs) -> tuple | None:
    """(params key, spec, value) with the lowest `{kind_n}_{spec}` among trials' final reports."""
    best = None
    for t in trials:
        last = t["rows"][-1]
        if not last.get("final"):
            continue
        for spec in specs:
            v = last.get(f"{kind_n}_{spec}")
            if v is not None and (best is None or v < best[2]):
                best = (key(t["params"]), spec, float(v))
    return best


def rung_vs_end(asha: list[dict], full: list[dict], rung_metric: str, metric: str) -> dict:
    """Spearman rank correlation over configurations: the rung's cheap metric (ASHA run) vs the sweep metric at the
    end (run without early stopping)."""
    from scipy.stats import spearmanr

    cheap = {key(t["params"]): r[rung_metric] for t in asha for r in t["rows"] if rung_metric in r}
    top = {key(t["params"]): t["rows"][-1][metric] for t in full if metric in t["rows"][-1]}
    common = sorted(set(cheap) & set(top))
    if len(common) < 3:
        return {"configs": len(common), "spearman": None}
    rho = spearmanr([cheap[k] for k in common], [top[k] for k in common]).statistic
    return {"configs": len(common), "spearman": round(float(rho), 3)}


# -- running the two sweeps ----------------------------------------------------------------------------------

def sweep_file(tmp, name, a, asha: bool) -> str:
    d = {"name": name, "base": os.path.join(ROOT, "configs", "fmnist_cpu.yaml"),
         "overrides": {"train.total_images": a.total_images, "train.batch_size": 32, "train.lr": 5.0e-4,
                       "train.ema_rate": 0.99, "train.ema_warmup": True, "train.eval_every_images": 0,
                       "train.grid_samples": 0, "train.log_every_images": 1024, "eval.num_samples": a.num_samples,
                       "eval.sampling_steps": SPECS, "eval.ref_samples": a.ref_samples, "eval.batch_size": 128,
                       "eval.metrics": ["kid"]},
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


def ratio(a, b):
    return round(a / b, 2) if b else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-images", type=int, default=9000)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--rung-samples", type=int, default=64)
    ap.add_argument("--ref-samples", type=int, default=500)
    ap.add_argument("--keep", default="", help="keep the two sweeps' storage here")
    a = ap.parse_args()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=ROOT)
    tmp = a.keep or tempfile.mkdtemp(prefix="p2cost-")
    os.makedirs(tmp, exist_ok=True)
    ref_s = reference_seconds(tmp, a)
    wall_b = run_sweep(sweep_file(tmp, "full", a, asha=False), os.path.join(tmp, "b"), env)
    wall_c = run_sweep(sweep_file(tmp, "asha", a, asha=True), os.path.join(tmp, "c"), env)
    full, asha = read_trials(os.path.join(tmp, "b", "full")), read_trials(os.path.join(tmp, "c", "asha"))
    cost_a = naive_cost(full, SPECS, a.num_samples, a.ref_samples, ref_s)
    cost_b = {**strategy_cost(full, a.ref_samples, ref_s), "wall_seconds": round(wall_b + ref_s, 1)}
    cost_c = {**strategy_cost(asha, a.ref_samples, ref_s), "wall_seconds": round(wall_c + ref_s, 1)}
    kind_n = f"kid{a.num_samples}"
    w_b, w_c = winner(full, kind_n, SPECS), winner(asha, kind_n, SPECS)
    out = {"scale": {"total_images": a.total_images, "num_samples": a.num_samples, "rung_samples": a.rung_samples,
                     "ref_samples": a.ref_samples, "configs": len(full), "specs": SPECS},
           "reference_seconds": round(ref_s, 1), "a_naive": cost_a, "b_p2sweep": cost_b, "c_p2sweep_asha": cost_c}
    for k in ("images_trained", "image_steps_generated", "images_featurised", "trial_seconds"):
        out[f"a_over_c_{k}"] = ratio(cost_a[k], cost_c[k])
        out[f"b_over_c_{k}"] = ratio(cost_b[k], cost_c[k])
    out["winner_a_b"] = {"params": dict(w_b[0]), "spec": w_b[1], "value": w_b[2]} if w_b else None
    out["winner_c"] = {"params": dict(w_c[0]), "spec": w_c[1], "value": w_c[2]} if w_c else None
    out["same_winner"] = bool(w_b and w_c and w_b[:2] == w_c[:2])
    out["rung_vs_end"] = rung_vs_end(asha, full, f"kid{a.rung_samples}_ddim10", f"{kind_n}_ddim10")
    for d in (cost_a, cost_b, cost_c):
        d["trial_seconds"] = round(d["trial_seconds"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
