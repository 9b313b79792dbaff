"""Test-only fault injection for sweeps; production code knows nothing of it.

Run the CLI through this file (`python tests/faults.py run SWEEP ...`) with `P2SWEEP_FAULTS` set to JSON:
  {"crash_at": 200}                 every trial raises once when it passes 200 images (a marker in its output dir
                                    makes the retry succeed); add "crash_always": true to raise on every attempt
  {"nan_at": 200, "nan_when": {"train.lr": 0.3}}   the loss turns NaN at 200 images in trials whose config matches
  {"kill_after_tell": true}         SIGKILL the driver's whole session right after the searcher told Optuna a result
Worker-side faults reach the Ray trial processes through Ray's `worker_process_setup_hook`.
"""
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def faults() -> dict:
    """From $P2SWEEP_FAULTS, or the JSON file $P2SWEEP_FAULTS_FILE (tests that share one Ray session rewrite it
    between sweeps: each new trial process reads it when it starts)."""
    path = os.environ.get("P2SWEEP_FAULTS_FILE")
    if path:
        with open(path) as f:
            return json.load(f)
    return json.loads(os.environ.get("P2SWEEP_FAULTS") or "{}")


def worker_setup() -> None:
    """Wrap Trainer.train_step in this process (a Ray worker, or a test's own process)."""
    f = faults()
    if not (f.get("crash_at") or f.get("nan_at")):
        return
    from p2core.trainer import Trainer

    if getattr(Trainer.train_step, "_faulty", False):
        return
    real = Trainer.train_step

    def train_step(self, x):
        after = self.images_seen + x.shape[0]
        if f.get("crash_at") and after >= f["crash_at"]:
            marker = os.path.join(self.out_dir, ".injected_crash")
            if f.get("crash_always") or not os.path.exists(marker):
                os.makedirs(self.out_dir, exist_ok=True)
                with open(marker, "w") as fh:
                    fh.write(str(self.images_seen))
                raise RuntimeError(f"injected crash at {self.images_seen} images")
        out = real(self, x)
        if f.get("nan_at") and after >= f["nan_at"]:
            flat = self.cfg.flat()
            if all(flat.get(k) == v for k, v in (f.get("nan_when") or {}).items()):
                out["loss"] = out["loss"] * float("nan")
        return out

    train_step._faulty = True
    Trainer.train_step = train_step


def with_worker_faults(init):
    """ray.init that installs worker_setup in every Ray worker process."""
    if getattr(init, "_faulty", False):
        return init

    def wrapped(*a, **kw):
        kw.setdefault("runtime_env", {})["worker_process_setup_hook"] = "faults.worker_setup"
        return init(*a, **kw)
    wrapped._faulty = True
    return wrapped


def install_driver_faults() -> None:
    f = faults()
    from sweeps.tune import ray_env

    real_init = ray_env.init_ray

    def init_ray(address, env_vars=None):
        ray_env.prepare(address)
        import ray

        ray.init = with_worker_faults(ray.init)
        return real_init(address, env_vars)

    ray_env.init_ray = init_ray
    if f.get("kill_after_tell"):
        from sweeps.tune import schedulers

        real_tell = schedulers.GroupSearcher.tell

        def tell(self, group):
            real_tell(self, group)
            if self.verdict(group)[0] == "complete":
                from procs import kill_session

                if os.getsid(0) != os.getpid():  # else the kill would reach the shell or pytest that started it
                    raise RuntimeError("kill_after_tell needs a driver that leads its own session (session=True)")
                kill_session(os.getsid(0), signal.SIGKILL)

        schedulers.GroupSearcher.tell = tell


def main() -> int:
    sys.path.insert(0, HERE)
    install_driver_faults()
    from sweeps.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
