"""A tracking store's client, bounded: MLflow's own HTTP retries off around p2sweep's calls, each call retried
within CALL_BUDGET_S (`Retrying`), a dead server found at start (`probe_tracking`), addresses printed without
passwords. No Ray import."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time

from ..storage import layout as L


log = logging.getLogger("p2sweep.tracking")


RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)  # between the tries of one call, as long as CALL_BUDGET_S allows
# One tracked call (so one Tune callback event) never takes longer than CALL_BUDGET_S: a try is started only when it can
# end (HTTP_TIMEOUT_S) within the budget. After a call gave up, calls fail at once for DOWN_HOLD_S, then try once.

CALL_BUDGET_S = 30.0

HTTP_TIMEOUT_S = 10

DOWN_HOLD_S = 60.0
# MLflow's REST client reads these at each request (mlflow/utils/rest_utils.py http_request); its defaults (7 retries,
# backoff factor 2, 120 s timeout: about 4 minutes a call) would stack under Retrying's own retries.

HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S)}

_env_lock = threading.Lock()

_env_depth = 0

_env_saved: dict = {}


@contextlib.contextmanager
def bounded_http():
    """MLflow's HTTP retries off and its timeout short for the calls inside (process-wide while any is inside, restored
    after the last: they are environment variables)."""
    global _env_depth, _env_saved
    with _env_lock:
        if _env_depth == 0:
            _env_saved = {k: os.environ.get(k) for k in HTTP_ENV}
            os.environ.update(HTTP_ENV)
        _env_depth += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_depth -= 1
            if _env_depth == 0:
                for k, v in _env_saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class Bounded:
    """An MlflowClient for a tracking server whose every call runs under `bounded_http`."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        fn = getattr(self._inner, name)
        if not callable(fn):
            return fn

        def call(*a, **kw):
            with bounded_http():
                return fn(*a, **kw)
        return call


def client(uri: str):
    """A client for `uri` only. (Not mlflow.set_tracking_uri: it also sets $MLFLOW_TRACKING_URI, which would
    send the next sweep started in the same process to this sweep's store.) For a tracking server, each request is
    tried once with a short timeout (`Bounded`): retrying is Retrying's job."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    return Bounded(c) if is_http(uri) else c


def _client_error(e: Exception) -> bool:
    """An answer that retrying cannot change (a 4xx other than 429: no such run, a bad value)."""
    try:
        code = e.get_http_status_code()
    except Exception:
        return False
    return 400 <= int(code) < 500 and int(code) != 429


class TrackingDown(RuntimeError):
    pass


class Retrying:
    """An MlflowClient whose calls are retried with backoff ("database is locked", a server restarting), each call
    within CALL_BUDGET_S. After one call has used up its budget, later calls fail at once for DOWN_HOLD_S, then try
    once until one succeeds, so a dead server costs one budget, not one per call."""

    def __init__(self, inner):
        self._inner, self._down_at = inner, None

    def __getattr__(self, name):
        fn = getattr(self._inner, name)
        if not callable(fn):
            return fn
        return lambda *a, **kw: self.retry(name, lambda: fn(*a, **kw))

    def retry(self, name: str, fn):
        """fn() under this client's retry policy (`name` for the messages)."""
        if self._down_at is not None:
            ago = time.monotonic() - self._down_at
            if ago < DOWN_HOLD_S:
                raise TrackingDown(f"MLflow {name} not tried: the tracking store failed {ago:.0f} s ago (tried again "
                                   f"{DOWN_HOLD_S:.0f} s after)")
        delays = () if self._down_at is not None else RETRY_DELAYS
        start = time.monotonic()
        for i in range(len(delays) + 1):
            try:
                out = fn()
                self._down_at = None
                return out
            except Exception as e:
                if _client_error(e):
                    raise
                if i == len(delays) or time.monotonic() - start + delays[i] + HTTP_TIMEOUT_S > CALL_BUDGET_S:
                    self._down_at = time.monotonic()
                    raise
                log.warning("MLflow %s failed (%s); retrying in %.1f s", name, one_line(e, 120), delays[i])
                time.sleep(delays[i])


def shown(uri: str) -> str:
    """`uri` for a message: a password in it replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        u = urlsplit(uri)
        if u.password:
            host = u.hostname or ""
            host = f"[{host}]" if ":" in host else host
            netloc = f"{u.username or ''}:***@{host}" + (f":{u.port}" if u.port else "")
            return urlunsplit(u._replace(netloc=netloc))
    except ValueError:
        return "<unparsable address>"
    return uri

_CREDS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^@\s/]*@")


def one_line(e: BaseException, n: int = 160) -> str:
    """An error as one line for a message or a log: its first line, a password in any address in it as ***
    (MLflow's errors quote the URL they called, user:password included)."""
    text = (str(e).splitlines() or [""])[0]
    return _CREDS.sub(r"\1:***@", text)[:n] if text else type(e).__name__


def probe_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with a one-line UserError, when `uri` is a tracking server (http/https) that does not answer
    (MLflow's client would retry each call for minutes). Any HTTP answer passes (an auth-protected or path-prefixed
    server may not answer /health with 200); no credentials are sent. Other URIs (sqlite, databases) pass."""
    if not is_http(uri):
        return
    import requests

    from p2core.errors import UserError

    url = uri.rstrip("/") + "/health"
    try:
        requests.get(url, timeout=(timeout, timeout), allow_redirects=False)
    except requests.exceptions.SSLError:
        return  # something answers; its certificate is MLflow's business (MLFLOW_TRACKING_SERVER_CERT_PATH, ...)
    except requests.RequestException as e:
        why = one_line(e)
        if isinstance(e, requests.ConnectionError):
            why = "connection refused or host unreachable" if not isinstance(e, requests.ConnectTimeout) else \
                f"no answer within {timeout:g} s"
        elif isinstance(e, requests.Timeout):
            why = f"no answer within {timeout:g} s"
        raise UserError(f"tracking.mlflow_uri {shown(uri)}: no MLflow tracking server answers there ({why})") \
            from None


def read_only_uri(meta, out=None) -> str:
    """The MLflow address a read-only command (report, ui) reads. A SQLite file named in the sweep's `p2sweep.json`
    (by default the storage's own `mlflow.db`) is read as it is: no credentials go there. A network address there
    was chosen by whoever can write the storage, and the credentials in MLFLOW_TRACKING_* would go to it, so
    $MLFLOW_TRACKING_URI, when set, is read instead. Says which on stderr before anything is contacted."""
    recorded = meta.paths.mlflow_uri
    env = "" if L.sqlite_file(recorded) else os.environ.get("MLFLOW_TRACKING_URI", "")
    uri = env or recorded
    if L.sqlite_file(recorded):
        src = "from p2sweep.json: the sweep's own file store"
    elif env:
        src = "from MLFLOW_TRACKING_URI" + (f"; p2sweep.json names {shown(recorded)}" if recorded != env else "")
    else:
        src = "from p2sweep.json; MLFLOW_TRACKING_URI overrides"
    print(f"p2sweep: reading MLflow at {shown(uri)} ({src})", file=out or sys.stderr)
    return uri
