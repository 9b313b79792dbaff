"""The p2sweep CLI with its local Ray told that the GPUs CUDA_VISIBLE_DEVICES lists exist (test only). On a GPU
machine Ray finds them itself (and keeps to CUDA_VISIBLE_DEVICES); this machine has none, and Ray accepts declared
GPUs on a CPU node, placing tasks on them and setting CUDA_VISIBLE_DEVICES as it would for real ones."""
import os
import sys

import ray

_init = ray.init


def init(*a, **kw):
    if kw.get("address") == "local":
        kw.setdefault("num_gpus", len([x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x]))
    return _init(*a, **kw)


ray.init = init

from sweeps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
