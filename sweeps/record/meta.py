"""Where a sweep lives and what it keeps about itself: names, storage paths and `p2sweep.json` (no Ray import).

`<storage>/<name>/p2sweep.json` is written once, when the sweep can start (Ray attached, Optuna storage opened,
baselines evaluated); a sweep without it does not exist, so a `run` that failed before it can simply be run again.
"""
from __future__ import annotations

import copy
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field

from p2core.errors import UserError

from ..storage.fs import is_uri, join, read_text, write_text
from ..storage import layout as L

META = "p2sweep.json"
STATES = "p2sweep_trials.json"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def validate_name(name: str, key: str = "--name") -> str:
    """One rule for run and resume: letters, digits, `_`, `-`, `.`; no path separators; not `.` or `..`."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise UserError(f"{key} {name!r}: a sweep name is letters, digits, '_', '-' and '.' only (no '/', not '.' "
                        "or '..')")
    return name


def storage_root(storage: str | None) -> str:
    """The storage as given (--storage, $P2SWEEP_STORAGE, ~/p2sweep): an absolute local path or a URI."""
    root = storage or os.environ.get("P2SWEEP_STORAGE") or os.path.join(os.path.expanduser("~"), "p2sweep")
    if is_uri(root):
        scheme, _, rest = root.partition("://")
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(root)


def exp_dir(name: str, storage: str | None) -> str:
    return join(storage_root(storage), validate_name(name, "sweep name"))


@dataclass
class Paths:
    storage: str          # absolute storage root (or a URI)
    mlflow_uri: str
    optuna_storage: str
    cache_dir: str        # reference statistics (and, for a path storage, the decoded-image cache)


@dataclass
class SweepMeta:
    """The sweep's metadata file: everything `resume`, `status`, `best` and `compare` need besides Tune's state."""
    name: str
    sweep_id: str         # keys the Optuna study: a reused name never warm-starts from another sweep's trials
    metric: str
    max_images: int
    base: dict            # the validated training config (all defaults filled in)
    source_yaml: str
    raw: dict             # the sweep file's mapping after --set
    paths: Paths
    parent_run_id: str
    experiment: str
    sweep_dir: str = "."
    address: str | None = None
    seeds: list = field(default_factory=lambda: [0])
    moved_from: str = ""  # the storage root recorded when it was last saved, where it differs from where it is now

    @property
    def dir(self) -> str:
        return join(self.paths.storage, self.name)

    def base_config(self):
        """The base training config as a `TrainingConfig` (validated again)."""
        from p2core.config import config_from_dict

        return config_from_dict(copy.deepcopy(self.base))

    @property
    def study_name(self) -> str:
        return f"{self.name}-{self.sweep_id[:8]}"

    def save(self) -> None:
        d = asdict(self)
        d.pop("moved_from")
        write_text(join(self.dir, META), json.dumps(d, indent=1, default=str))

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex


def load_meta(name: str, storage: str | None) -> SweepMeta:
    d = exp_dir(name, storage)
    p = join(d, META)
    text = read_text(p)
    if text is None:
        raise UserError(f"unknown sweep {name!r} in storage {storage_root(storage)} (no {META} in {d})")
    try:
        data = json.loads(text)
        data.pop("moved_from", None)
        _follow_move(data, storage_root(storage))
        from p2core.metrics import canonical_metric_name

        # a sweep run before names were normalised may spell the count its own way (kid1000_ddim25): its trials
        # report the evaluator's spelling (kid1k_ddim25)
        data["metric"] = canonical_metric_name(data["metric"])
        data["paths"] = Paths(**data["paths"])
        return SweepMeta(**data)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise UserError(f"{p}: not a p2sweep metadata file of this version ({e})") from None


def _follow_move(data: dict, root: str) -> None:
    """A storage folder that was moved or copied: the files that lived in it (the default SQLite stores, the
    reference statistics) are now under its new root. Paths elsewhere (a tracking server, a shared cache) stay."""
    old = data["paths"]["storage"]
    if old == root or (not is_uri(old) and not is_uri(root) and os.path.exists(old) and os.path.exists(root)
                       and os.path.samefile(old, root)):
        return  # the same folder by another name (a symlink, a bind mount): not a move
    if not is_uri(old) and is_uri(root):
        raise UserError(f"sweep storage {root}: this sweep was written in the folder {old}, whose SQLite stores cannot "
                        "live in a bucket: use it where it was written")
    for k in ("mlflow_uri", "optuna_storage", "cache_dir"):
        v = data["paths"][k]
        for prefix in (L.SQLITE, ""):
            if v.startswith(prefix + old + "/") or v == prefix + old:
                data["paths"][k] = prefix + root + v[len(prefix + old):]
                break
    data["paths"]["storage"] = root
    data["moved_from"] = old
