"""Ray overhead: wall time of the smoke sweep (`p2sweep run`, scheduler off so every trial trains to the end)
against the same trials run one after another in-process with the p2core Trainer. Prints one JSON line."""
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402


def main():
    spec = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "smoke.yaml")))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TQDM_DISABLE="1", PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", os.path.join(ROOT, "search_spaces/smoke.yaml"),
                            "--storage", os.path.join(tmp, "s"), "--set", "scheduler.type=none"], env=env,
                           capture_output=True, text=True, cwd=ROOT)
        ray_s = time.perf_counter() - t0
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            sys.exit(1)
        from p2core.config import apply_overrides, config_from_dict
        from p2core.trainer import Trainer

        keys = list(spec["space"])
        t0 = time.perf_counter()
        n = 0
        for vals in itertools.product(*[spec["space"][k]["grid"] for k in keys]):
            d = apply_overrides(spec["base"], {**dict(zip(keys, vals)), "metric": spec["metric"],
                                               "eval.cache_dir": os.path.join(tmp, "cache"), "train.num_threads": 1})
            Trainer.from_config(config_from_dict(d), os.path.join(tmp, f"seq{n}"), progress=False).run()
            n += 1
        seq_s = time.perf_counter() - t0
    print(json.dumps({"trials": n, "ray_sweep_wall_s": round(ray_s, 1), "sequential_in_process_s": round(seq_s, 1),
                      "ratio": round(ray_s / seq_s, 2), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
