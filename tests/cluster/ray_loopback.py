"""The `ray` CLI for a multi-node cluster on one machine that stays on loopback (test only).

Ray turns 127.0.0.1 (in --node-ip-address, --address) into the machine's network address, unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which in turn makes `ray start` refuse every node but the head. Here the CLI
keeps 127.0.0.1 as given, and the processes it starts (GCS, raylet, agents, workers) get the variable, so every
address any of them advertises or dials is 127.0.0.1."""
import os
import sys

os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # this process: a second node may start

from ray._private import services  # noqa: E402

services.resolve_ip_for_localhost = lambda host: host
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the processes it starts: loopback only

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
