"""Where a sweep lives and what it keeps about itself: names, storage paths and `p2sweep.json` (no Ray import).

`<storage>/<name>/p2sweep.json` is written once, when the sweep can start (Ray attached, Optuna storage opened,
baselines evaluated); a sweep without it does not exist, so a `run` that failed before it can simply be run again.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from p2core.errors import UserError

from ..storage.fs import is_uri, join, read_text, write_text
from ..storage import layout as L

if TYPE_CHECKING:
    from .spec import SweepSpec

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
    """The sweep's metadata file: everything `resume`, `status`, `best` and `compare` need besides Tune's state.
    What the sweep *is* (base config, metric, space, search, scheduler, resources, tracking, seeds) has one home,
    `spec`; the rest is where it runs and what it was given (ids, paths, the parent run)."""
    name: str
    sweep_id: str         # keys the Optuna study: a reused name never warm-starts from another sweep's trials
    spec: "SweepSpec"
    paths: Paths
    parent_run_id: str
    experiment: str
    sweep_dir: str = "."  # the sweep file's folder (relative paths in it)
    address: str | None = None
    moved_from: str = ""  # the storage root recorded when it was last saved, where it differs from where it is now
    read_version: int = 2  # the p2sweep.json version it was read from (VERSION once saved)

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def max_images(self) -> int:
        return self.spec.max_images

    @property
    def base(self) -> dict:
        return self.spec.base

    @property
    def seeds(self) -> list:
        return self.spec.seeds

    @property
    def dir(self) -> str:
        return join(self.paths.storage, self.name)

    def base_config(self):
        """The base training config as a `TrainingConfig` (validated again)."""
        return self.spec.base_config()

    @property
    def study_name(self) -> str:
        return f"{self.name}-{self.sweep_id[:8]}"

    def save(self) -> None:
        d = {"version": VERSION, "name": self.name, "sweep_id": self.sweep_id, "sweep": self.spec.record(),
             "paths": asdict(self.paths), "parent_run_id": self.parent_run_id, "experiment": self.experiment,
             "sweep_dir": self.sweep_dir, "address": self.address}
        write_text(join(self.dir, META), json.dumps(d, indent=1))
        self.read_version = VERSION

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex


VERSION = 2  # p2sweep.json with the nested sweep record; version 1 (no "version") kept the sweep file's mapping


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
        from .spec import SweepSpec

        version = data.pop("version", 1)
        if version > VERSION:
            raise UserError(f"{p}: written by a newer p2sweep (metadata version {version}; this one reads up to "
                            f"{VERSION})")
        data["spec"] = SweepSpec.from_record(data.pop("sweep")) if version == VERSION else _spec_of_v1(data, p)
        data["paths"] = Paths(**data["paths"])
        return SweepMeta(**data, read_version=version)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise UserError(f"{p}: not a p2sweep metadata file of this version ({e})") from None


def _spec_of_v1(data: dict, path: str):
    """A sweep started before the nested record: its spec parsed again from the sweep file's mapping it kept, with
    the validated base config it recorded (its baselines as recorded: their checkpoints need not be on this machine
    any more, they were evaluated when the sweep started). Pops the version-1 keys from `data`. Its `overrides`
    are the sweep file's only (a version-1 file does not say which `--set base.*` values went into the base)."""
    from p2core.metrics import canonical_metric_name

    from .spec import parse_sweep

    raw = dict(data.pop("raw"))
    overrides = raw.pop("overrides", None) or {}  # already applied to the stored base
    baselines = raw.pop("baselines", None) or []
    # a sweep run before names were normalised may spell the count its own way (kid1000_ddim25): its trials
    # report the evaluator's spelling (kid1k_ddim25)
    raw["metric"] = canonical_metric_name(data.pop("metric"))
    here = data.get("sweep_dir", ".")
    try:
        spec = parse_sweep(raw | {"base": data.pop("base"), "name": data["name"]}, here)
    except UserError as e:
        raise UserError(f"{path}: its version-1 sweep record no longer validates ({e})") from None
    spec.baselines = [{"name": b["name"], "checkpoint": os.path.join(here, b["checkpoint"]),
                       "overrides": b.get("overrides") or {}} for b in baselines]
    spec.overrides, spec.source_yaml = overrides, data.pop("source_yaml", "")
    for k in ("max_images", "seeds"):
        data.pop(k, None)
    return spec


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
