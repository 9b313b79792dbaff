"""Which of Ray Tune's saved experiment states is the newest (no Ray import).

Tune 2.60 names `experiment_state-<session>.json`, `search_gen_state-<session>.json` and
`searcher-state-<session>.pkl` by the driver's *local* start time (`%Y-%m-%d_%H-%M-%S`) and, on restore, takes the
largest name as the newest (those names and formats: sweeps/compat.py). A sweep resumed from a machine whose clock
or time zone is behind (a laptop in UTC-5 for a sweep started on a UTC head, a daylight-saving change) writes a newer
state under a smaller name, and the next restore reads the older one: finished trials come back RUNNING and retrain
from older checkpoints.

Two defences: the driver pins its time zone to UTC (`pin_utc`, before Tune names anything), and states are picked
by the start time each experiment state records in itself (`stats.start_time`, seconds since the epoch), not by
name; before a restore, the files of sessions that only *look* newer are moved aside so Tune's own pick agrees.
"""
from __future__ import annotations

import json
import os
import time

from .. import compat
from . import fs as S

PATTERNS = compat.STATE_PATTERNS  # Tune's state files, one of each per session
STALE = "p2sweep_stale_states"  # where set_aside moves them (Tune lists only the experiment folder's own files)


def pin_utc() -> None:
    """Give this driver (and the local Ray it starts) UTC as its time zone: Tune's state names then sort in time
    order whichever machine runs the driver."""
    os.environ["TZ"] = "UTC"
    time.tzset()


def session_of(name: str) -> str:
    """`experiment_state-2026-12-02_20-46-35.json` -> `2026-12-02_20-46-35`."""
    return compat.state_session(name)


def recorded_start(path: str) -> float:
    """The session start time an experiment state records (0 when unreadable: then its name decides)."""
    try:
        return compat.state_start_time(json.loads(S.read_text(path) or "{}"))
    except (ValueError, TypeError, AttributeError):
        return 0.0


def newest_experiment_state(d: str) -> str | None:
    """The experiment state of the session that started last, by its own record (its name breaks ties)."""
    files = S.glob(d, PATTERNS[0])
    if not files:
        return None
    return max(files, key=lambda f: (recorded_start(f), S.basename(f)))


def set_aside_stale(d: str) -> list[str]:
    """Move Tune's state files whose names sort above the newest session's into `<d>/p2sweep_stale_states/`, so
    that Tune's restore (largest name wins) reads the newest state. Returns the names moved."""
    newest = newest_experiment_state(d)
    if newest is None:
        return []
    keep = session_of(S.basename(newest))
    moved = []
    for pattern in PATTERNS:
        for f in S.glob(d, pattern):
            name = S.basename(f)
            if session_of(name) > keep:
                data = S.read_bytes(f)
                if data is None:
                    continue
                S.write_bytes(S.join(d, STALE, name), data)
                S.remove(f)
                moved.append(name)
    return moved
