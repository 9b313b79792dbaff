"""A trial's identity and its effective training config, read from the config Tune gives the trial (no Ray import).

A sweep's configuration is a *group*: the searcher gives every trial of it the configuration's values, the group
key `p2sweep_group` and one seed `train.seed` (its replicate). `Replicate.of(config)` is the one reader of those two
keys; `trial_config(base, values)` the one builder of the training config a trial runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from p2core.config import TrainingConfig, apply_overrides, config_from_dict

GROUP_KEY = "p2sweep_group"   # config key: the configuration a trial belongs to (its seeds share it)
SEED_KEY = "train.seed"       # config key: the replicate's seed (a training config value)
NO_GROUP = -1                 # the group of a trial whose config carries no group key


def config_key(group: int, params: dict):
    """A configuration's key: its group, or its values when it carries none (trials without a group key)."""
    return group if group >= 0 else json.dumps(params, sort_keys=True, default=str)


@dataclass(frozen=True)
class Replicate:
    """One (configuration, seed) of a sweep. `params`: the configuration's values without the group key and the
    seed; `key`: `"<group>:<seed>"` ("-" for a key the config lacks), the tag of its MLflow run."""
    group: int = NO_GROUP
    seed: int = 0                                   # 0 when the config carries none
    params: dict = field(default_factory=dict)
    key: str = ""

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", f"{self.group}:{self.seed}")

    @classmethod
    def of(cls, config: dict | None) -> "Replicate":
        config = config or {}
        g, s = config.get(GROUP_KEY), config.get(SEED_KEY)
        return cls(group=NO_GROUP if g is None else int(g), seed=0 if s is None else int(s),
                   params={k: v for k, v in config.items() if k not in (GROUP_KEY, SEED_KEY)},
                   key=f"{config.get(GROUP_KEY, '-')}:{config.get(SEED_KEY, '-')}")

    @property
    def shown(self) -> tuple[str, str]:
        """(group, seed) as the config has them, "-" for one it lacks (the key's two halves)."""
        g, _, s = self.key.partition(":")
        return g, s

    @property
    def config_key(self):
        """The configuration's key (`config_key`): what the ranking, the report and the MLflow view group by."""
        return config_key(self.group, self.params)

    def config(self) -> dict:
        """The trial config the searcher hands Tune: the values, the seed, the group key."""
        return {**self.params, SEED_KEY: self.seed, GROUP_KEY: self.group}


def config_values(config: dict) -> dict:
    """The training-config values of a trial's config (its seed included): everything but the group key."""
    return {k: v for k, v in config.items() if k != GROUP_KEY}


def trial_config(base: dict, values: dict) -> TrainingConfig:
    """The validated training config of a trial: the sweep's base (a nested mapping) with the trial's values on top
    (the group key is bookkeeping, not a config value)."""
    return config_from_dict(apply_overrides(base, config_values(values)))
