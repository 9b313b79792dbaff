"""What `eval.ema_sigma_rels` costs an evaluation, side by side in one process: the same tiny power-EMA run (16 px
synthetic images, the smoke sweep's UNet, the random feature network, snapshots every 16 images) trained and
evaluated at 128 and 256 images with no extra sigma_rel and with each of `--sigma-rels` added, alternating,
`--repeats` times. Reports each evaluation's median seconds and the part spent on the reconstructed EMAs
(reconstruction + their evaluation). Prints one JSON line.

  python bench/ema_eval_cost.py [--sigma-rels 0.07,0.15] [--samples 64] [--threads 2] [--repeats 3]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p2core.config import config_from_dict  # noqa: E402
from p2core.trainer import Trainer, read_jsonl  # noqa: E402


def config(sigma_rels, samples, threads):
    return config_from_dict({
        "model": {"image_size": 16, "in_channels": 1, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                  "attention_resolutions": "8", "num_head_channels": 32},
        "diffusion": {"diffusion_steps": 100, "learn_sigma": True, "rescale_learned_sigmas": True},
        "data": {"dataset": "synthetic", "max_images": 64},
        "train": {"total_images": 256, "batch_size": 16, "lr": 1e-3, "eval_every_images": 128, "log_every_images": 64,
                  "num_threads": threads, "grid_samples": 0, "bf16": False,
                  "ema": {"type": "power", "sigma_rels": [0.05, 0.10], "snapshot_every_images": 16}},
        "eval": {"num_samples": samples, "sampling_steps": ["ddim5"], "extractor": "random", "ref_samples": 64,
                 "batch_size": 64, "ema_sigma_rels": sigma_rels},
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sigma-rels", default="0.07,0.15")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    extra = [float(x) for x in a.sigma_rels.split(",") if x]
    out = {"bench": "ema_eval_cost", "sigma_rels": extra, "samples": a.samples, "repeats": a.repeats}
    runs: dict = {"tracked_only": [], "with_sigma_rels": []}
    for _ in range(a.repeats):  # alternating, so that drift of the machine hits both alike
        for label, rels in (("tracked_only", []), ("with_sigma_rels", extra)):
            with tempfile.TemporaryDirectory() as d:
                Trainer.from_config(config(rels, a.samples, a.threads), d, progress=False).run()
                ev = [r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if r["kind"] == "eval"]
            runs[label].append(ev)
    for label, evs in runs.items():
        out[label] = {"at_images": [e["images_seen"] for e in evs[0]],
                      "median_eval_seconds": [round(statistics.median(ev[i]["eval_seconds"] for ev in evs), 3)
                                              for i in range(len(evs[0]))],
                      "median_ema_part_seconds": [round(statistics.median(ev[i].get("ema_eval_seconds", 0.0)
                                                                          for ev in evs), 3)
                                                  for i in range(len(evs[0]))]}
    base = out["tracked_only"]["median_eval_seconds"][-1]
    out["last_eval_ratio"] = round(out["with_sigma_rels"]["median_eval_seconds"][-1] / base, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
