"""What a path storage holds beside its sweeps, and how its SQLite stores are named: one home for the layout
`<storage>/{mlflow.db, optuna.db, mlartifacts/, cache/}` and for `sqlite:///` URIs (built and parsed only here)."""
from __future__ import annotations

import os

SQLITE = "sqlite:///"
MLFLOW_DB = "mlflow.db"
OPTUNA_DB = "optuna.db"
ARTIFACTS = "mlartifacts"  # MLflow's artifacts of the storage's own SQLite store (not ./mlruns)
CACHE = "cache"            # reference statistics


def sqlite_uri(path: str) -> str:
    """The SQLAlchemy URI of the SQLite file at `path` (made absolute)."""
    return SQLITE + os.path.abspath(path)


def sqlite_file(uri: str) -> str:
    """The file of a `sqlite:///` URI; "" for any other URI (a tracking server, a database server)."""
    return uri[len(SQLITE):] if uri.startswith(SQLITE) else ""


def mlflow_db_uri(root: str) -> str:
    """The storage's own MLflow store."""
    return sqlite_uri(os.path.join(root, MLFLOW_DB))


def optuna_db_uri(root: str) -> str:
    """The storage's own Optuna store."""
    return sqlite_uri(os.path.join(root, OPTUNA_DB))


def artifact_root(uri: str) -> str | None:
    """Where MLflow's artifacts of a SQLite store live: beside it (`<storage>/mlartifacts`); None for a tracking
    server, which decides for itself."""
    f = sqlite_file(uri)
    return os.path.join(os.path.dirname(f), ARTIFACTS) if f else None


def in_storage(uri: str, root: str) -> bool:
    """Whether `uri` is a SQLite store inside the storage folder `root` (one that moves with it)."""
    f = sqlite_file(uri)
    return bool(f) and (f == root or f.startswith(root.rstrip("/") + "/"))
