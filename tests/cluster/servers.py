"""Real servers on 127.0.0.1 for the cluster tests, each a process of its own that the fixture starts and stops by its
PID (its whole session, nothing else): an S3 API (moto), an MLflow tracking server with its artifacts in that
bucket, Ray nodes (`ray start --block`, never `ray stop`)."""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.dirname(sys.executable)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from procs import kill_session  # noqa: E402
ROOT = os.path.dirname(os.path.dirname(HERE))
BUCKET = "p2sweep-test"
# looks like a secret so that a leak is easy to find: the tests grep the bucket, p2sweep.json and MLflow for it
SECRET = "p2secret" + secrets.token_hex(12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.3)
    return False


def wait_http(url: str, proc, log: str, seconds: float = 120) -> None:
    """Until `url` answers; fails with the end of the server's log when it exits or takes too long."""
    end = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.time() > end or proc.poll() is not None:
                raise AssertionError(f"{url} did not come up: " + open(log).read()[-2000:])
            time.sleep(0.5)


def start(cmd: list, env: dict, log: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)


def stop(p: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """The process and every process it started (its session), by its PID. SIGKILL reaches all of them at once
    (a lost machine); otherwise its process group gets `sig` first and what is left after 5 s is killed."""
    if sig == signal.SIGKILL:
        kill_session(p.pid, sig)
    else:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
    kill_session(p.pid, signal.SIGKILL)
    p.wait()


class S3:
    """`moto_server` on 127.0.0.1 with one bucket; `env` is what a client needs (endpoint and credentials)."""

    def __init__(self, tmp: str):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": "p2test",
                    "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}
        self.proc = start([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                          dict(os.environ), os.path.join(tmp, "moto.log"))
        assert wait_port(self.port, 60), "moto_server did not come up"
        self.client().create_bucket(Bucket=BUCKET)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="p2test",
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def keys(self, prefix: str) -> list:
        out, token = [], None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            r = self.client().list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def stop(self):
        stop(self.proc)


class MLflowServer:
    """`mlflow server` on 127.0.0.1: SQLite backend, artifacts proxied into s3://BUCKET/mlartifacts."""

    def __init__(self, tmp: str, s3: S3):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, **s3.env, MLFLOW_S3_ENDPOINT_URL=s3.endpoint, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                   MLFLOW_DISABLE_TELEMETRY="true")
        self.proc = start([os.path.join(BIN, "mlflow"), "server", "--backend-store-uri",
                           f"sqlite:///{os.path.join(tmp, 'mlflow.db')}", "--artifacts-destination",
                           f"s3://{BUCKET}/mlartifacts", "--host", "127.0.0.1", "--port", str(self.port),
                           "--workers", "1"], env, os.path.join(tmp, "mlflow.log"))
        wait_http(f"{self.uri}/health", self.proc, os.path.join(tmp, "mlflow.log"))

    def stop(self):
        stop(self.proc)


class RayNode:
    """`ray start --block` on 127.0.0.1 (a head, or a worker joining `address`) with its own --temp-dir."""

    def __init__(self, tmp: str, env: dict, head_address: str = "", num_cpus: int = 1, name: str = "",
                 resources: str = "", num_gpus: int = 0):
        self.temp = tempfile.mkdtemp(prefix="p2rn", dir="/tmp")  # Ray's socket paths must stay under 107 chars
        cmd = [sys.executable, os.path.join(HERE, "ray_loopback.py"), "start", "--block",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp}",
               "--object-store-memory=100000000", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}"]
        if head_address:
            cmd += [f"--address={head_address}"]
            self.port = None
        else:
            self.port = free_port()
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        if name:
            cmd += [f"--node-name={name}"]
        if resources:
            cmd += [f"--resources={resources}"]
        if num_gpus:  # declared GPUs on a CPU machine: Ray places and accounts for them as for real ones
            cmd += [f"--num-gpus={num_gpus}"]
        log = os.path.join(tmp, f"ray-{name or 'head'}.log")
        self.proc = start(cmd, env, log)
        if self.port:
            end = time.time() + 90
            while not wait_port(self.port, 1):
                assert self.proc.poll() is None and time.time() < end, open(log).read()[-2000:]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig=signal.SIGTERM):
        stop(self.proc, sig)
        shutil.rmtree(self.temp, ignore_errors=True)
