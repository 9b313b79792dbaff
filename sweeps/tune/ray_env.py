"""Starting or attaching Ray, and the environment it needs BEFORE `import ray`.

- Local (no --address, no $RAY_ADDRESS): `ray.init(address="local")`, a fresh Ray of our own that never joins a
  cluster someone started on the machine, with every address on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
- Attach: when `~/.ray/auth_token` exists, RAY_AUTH_MODE=token (as a local `ray.init()` would); Ray reads it at
  import time, so `prepare()` runs before anything imports Ray.
- Always: no Ray usage statistics, no MLflow telemetry.
"""
from __future__ import annotations

import os
import sys

from p2core.errors import UserError

from ..compat import RAY_CURRENT_CLUSTER_FILE


def resolve_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def privacy_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def token_file() -> str:
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def prepare(address: str | None) -> None:
    """Set the environment for a local Ray or for attaching to `address`; call before Ray is imported."""
    privacy_env()
    if resolve_address(address) is None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    elif os.path.exists(token_file()) and not os.environ.get("RAY_AUTH_MODE"):
        if "ray" in sys.modules:  # too late for Ray to see it: say so instead of failing with InvalidAuthToken
            raise UserError("internal: Ray was imported before RAY_AUTH_MODE could be set; export RAY_AUTH_MODE=token")
        os.environ["RAY_AUTH_MODE"] = "token"


def storage_env(endpoint: str = "", region: str = "") -> dict:
    """The sweep file's tracking.s3_endpoint_url / s3_region, where the environment does not already say; returns
    what was taken from the sweep file, for the sweep's Ray workers on every node (where the bucket is, never who
    may use it: each node has its own credentials). Values from the environment stay the nodes' own business."""
    taken = {}
    if endpoint and not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        taken["AWS_ENDPOINT_URL_S3"] = endpoint
    if region and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        taken["AWS_REGION"] = region
    os.environ.update(taken)
    # MLflow's own S3 client (artifacts logged straight to an s3:// artifact root) reads only this variable
    ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if ep and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = ep
        if "AWS_ENDPOINT_URL_S3" in taken:
            taken["MLFLOW_S3_ENDPOINT_URL"] = ep
    return taken


def init_ray(address: str | None, env_vars: dict | None = None) -> None:
    """Start or attach Ray; `env_vars` go to the sweep's workers on every node."""
    prepare(address)
    address = resolve_address(address)
    import ray

    if ray.is_initialized():
        return
    # merged with a submitted job's own runtime_env key by key (these keys were not in its environment)
    extra = {"runtime_env": {"env_vars": dict(env_vars)}} if env_vars else {}
    if address is None:
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", configure_logging=True, **extra)
        return
    probe(address)
    try:
        ray.init(address=address, logging_level="WARNING", **extra)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        hint = ""
        if "auth" in msg.lower() or "token" in msg.lower():
            hint = (" (the cluster uses token authentication: copy its ~/.ray/auth_token to this machine; p2sweep "
                    "then sets RAY_AUTH_MODE=token)")
        raise UserError(f"--address {address}: cannot attach to the Ray cluster: {msg}{hint}") from None


def probe(address: str, timeout: float = 5.0) -> None:
    """Fail at once when nothing listens at the address (ray.init would retry a dead address for many minutes).
    `auto` is the address `ray start` recorded on this machine."""
    import socket

    if address == "auto":
        recorded = RAY_CURRENT_CLUSTER_FILE
        if not os.path.exists(recorded):
            raise UserError("--address auto: no Ray cluster was started on this machine (`ray start --head`); "
                            "give HOST:PORT of the head node")
        with open(recorded) as f:
            address = f.read().strip()
    if address.startswith("ray://"):
        return  # Ray Client: its own connection errors are quick
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise UserError(f"--address {address}: no Ray head answers there ({e.__class__.__name__}: {e}); is "
                        "`ray start --head` running, and is this the GCS port (default 6379)?") from None


def shutdown() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def node_resources() -> list[dict]:
    """The resources of each alive Ray node ({'CPU': 2.0, 'GPU': 1.0, ...})."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _describe(n: dict) -> str:
    cpu, gpu = n.get("CPU", 0), n.get("GPU", 0)
    return f"{cpu:g} CPU" + (f" + {gpu:g} GPU" if gpu else "")


def fit_problem(cpu: float, gpu: float, nodes: list[dict]) -> str:
    """Why no node can hold one trial ({'CPU': cpu, 'GPU': gpu}), or "" when one can. Ray itself never says: such a
    trial pends for ever while the autoscaler logs "No available node types can fulfill resource request"."""
    if any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        return ""
    gpus = [n.get("GPU", 0) for n in nodes]
    seen = f"Ray sees {len(nodes)} node(s): {', '.join(_describe(n) for n in nodes) or 'none'}"
    if gpu and max(gpus, default=0) < gpu:
        return (f"resources.gpu {gpu:g}: no Ray node has a GPU share of {gpu:g} for one trial ({sum(gpus):g} GPU(s) "
                f"in all); {seen}")
    need = f"{cpu:g} CPU(s)" + (f" and {gpu:g} GPU" if gpu else "")
    return f"resources.cpu {cpu:g}: no Ray node has {need} for one trial; {seen}"


def check_fits(cpu: float, gpu: float, attached: bool) -> None:
    """Stop a sweep whose trials cannot be placed anywhere, before anything is written. On the local Ray that is an
    error (exit 2); attached to a cluster a warning, since an autoscaling cluster may still add a node that fits."""
    why = fit_problem(cpu, gpu, node_resources())
    if not why:
        return
    if not attached:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = ((f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "") +
                ": set resources.gpu to 0 (no --gpus) here, or run on a machine with a GPU" if gpu else
                ": lower resources.cpu (--cpus)")
        raise UserError(why + hint)
    print(f"p2sweep: warning: {why}; its trials wait until a node that fits joins the cluster (an autoscaling "
          "cluster may add one; otherwise stop with Ctrl-C and lower resources.*)", file=sys.stderr)
