"""The sweep's scheduler and searcher for Ray Tune, built for replicate seeds. The one module that knows how Tune
drives schedulers/searchers (the private parts it relies on, such as reopening an Optuna trial by id, are in
sweeps/compat.py); tested without a Ray session.

Replicates: every configuration runs once per seed (`seeds:`), all seeds with the same values, whatever the search
(grid, random, Optuna). A configuration is a *group*; its trials carry `p2sweep_group` in their config.

- `GroupSearcher` hands out each configuration once per seed. Grid and random draws are a pure function of
  (search.seed, group index), so a sweep is reproducible and a trial lost in a driver crash comes back with the same
  values. With Optuna it asks the study once per group and tells it once per group: COMPLETE with the mean over
  seeds only if every seed reached the end, PRUNED (with the mean at each rung as intermediate values) if any seed
  was stopped early, FAIL if a seed raised. Telling is idempotent (a resumed trial may finish twice), and Optuna
  trials asked after Tune's last state save are adopted again on resume instead of being left RUNNING.
- `GroupASHA` is ASHA (Li et al. 2020, Ray's `_Bracket` rule) on groups: at each rung the group's value is the mean
  over its seeds (a seed that diverged or raised counts as +inf), and the group continues if that mean is within the
  best 1/reduction_factor of the group means recorded at that rung before it. The decision is made when the last
  seed reaches the rung; seeds that got there first train on meanwhile and are stopped at their next report if the
  group is stopped. Ray does not save scheduler state: the rung records are rebuilt from the trials' results.
  Values are each report's `rung_score` (sweeps/record/trial_report.py): with multi-fidelity rungs a low rung
  compares its own cheaper metric, the same for every trial at that rung. Each decision made live is one INFO line of the logger
  `p2sweep.asha` (the sweep's console); decisions rebuilt on resume are not printed again (one line says how many).
"""
from __future__ import annotations

import itertools
import logging
import math
import pickle
import warnings

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import SearchGenerator, Searcher

from p2core.errors import UserError

from .. import compat
from ..record.replicate import Replicate
from ..record.spec import num_configs
from ..record.trial_report import RUNG_METRIC, RUNG_SCORE, TrialReport, finite_or_inf, group_choice, group_score

check_versions, TESTED_RAY, TESTED_OPTUNA = compat.check_versions, compat.TESTED_RAY, compat.TESTED_OPTUNA  # old names

_BIG = 1e300  # stands for +inf inside percentiles (np.percentile turns inf into nan when it interpolates)
log = logging.getLogger("p2sweep.asha")


def group_of(trial_or_config) -> int:
    return Replicate.of(getattr(trial_or_config, "config", trial_or_config)).group


# -- the scheduler -----------------------------------------------------------------------------------------------

def _restore_state(obj, state: dict) -> None:
    """Unpickling of GroupASHA / GroupSearcher; one pickled by p2sweep before multi-fidelity rungs (the tuner.pkl of a
    sweep resumed after an upgrade) declared the sweep metric to Tune: it becomes `sweep_metric`, Tune's is rung_score."""
    obj.__dict__.update(state)
    if "sweep_metric" not in state:
        obj.sweep_metric = state.get(compat.PICKLED_METRIC)
        compat.set_declared_metric(obj, RUNG_SCORE)


class GroupASHA(FIFOScheduler):
    """ASHA over groups of seeds. `milestones`: rungs in images below max_images; `history`: a picklable callable
    returning [(trial_id, group, images_seen, value, ended)] in the order things happened (to rebuild the rungs on
    resume; `ended`: the seed diverged or raised; images_seen None when the row only says so: the seed raised out of
    retries then). A seed that reports again (an errored one retried by `resume --retry-errored`) is no longer
    ended: the decisions made while it counted as +inf stay, the rungs still open wait for it."""

    def __init__(self, metric: str, milestones, reduction_factor: float, seeds_per_group: int,
                 time_attr: str = "images_seen", history=None):
        super().__init__()
        # Tune checks that every result holds the scheduler's metric: rung_score is in every report, the sweep
        # metric is not (a low rung of a multi-fidelity sweep computes only its own metric)
        compat.set_declared_metric(self, RUNG_SCORE, "min")
        self.sweep_metric = metric
        self.milestones = sorted(int(m) for m in milestones)
        self.rf = float(reduction_factor)
        self.n_seeds = int(seeds_per_group)
        self.time_attr = time_attr
        self.history = history
        self._clear()

    def _clear(self):
        self.rung_means: dict = {m: {} for m in self.milestones}  # milestone -> {group: mean}, in decision order
        self.values: dict = {}        # (milestone, group) -> {trial_id: value}
        self.ended: dict = {}         # group -> {trial_id}: seeds that diverged or raised (count as +inf later on)
        self.raised: dict = {}        # group -> {trial_id}: those of `ended` that raised (Tune may retry them)
        self.stopped: dict = {}       # group -> milestone at which the group was stopped
        self.trials: dict = {}        # group -> {trial_id: Trial} (live objects; their status tells ERROR)
        self.rung_names: dict = {}    # milestone -> the metric its values are (the reports' rung_metric)
        self._replaying = False       # rebuilding from history: decisions made then were printed when made live
        self._seeded = self.history is None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["trials"] = {}
        return d

    # Tune's hooks
    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def __setstate__(self, state):
        _restore_state(self, state)
        for k, v in (("raised", {}), ("rung_names", {}), ("_replaying", False)):  # pickled by an older p2sweep
            self.__dict__.setdefault(k, v)

    def on_trial_add(self, tune_controller, trial):
        self._seed()
        g = group_of(trial)
        self.trials.setdefault(g, {})[trial.trial_id] = trial
        if trial.trial_id in self.raised.get(g, set()) and getattr(trial, "status", None) != "ERROR":
            self._back(trial.trial_id, g)  # Tune runs an errored trial again (`resume --retry-errored`)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._seed()
        g = group_of(trial)
        self.trials.setdefault(g, {})[trial.trial_id] = trial
        value = result.get(RUNG_SCORE, result.get(self.sweep_metric))  # results of older versions: the metric
        if result.get("rung_candidates"):  # scheduler.ema_rule best
            value = TrialReport.from_result(self.sweep_metric, result).judged
        self._report(trial.trial_id, g, result.get(self.time_attr), value, bool(result.get("diverged")),
                     str(result.get(RUNG_METRIC) or ""))
        return TrialScheduler.STOP if g in self.stopped else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict):
        if result and result.get("diverged"):
            g = group_of(trial)
            self.ended.setdefault(g, set()).add(trial.trial_id)
            self.decide(g)

    def on_trial_error(self, tune_controller, trial):
        # Tune calls this for every failure, retried or not; only a trial out of retries ends its seed
        # (num_failures is already counted when this runs: compat.out_of_retries)
        if compat.out_of_retries(trial):
            self._raise(trial.trial_id, group_of(trial))

    def debug_string(self) -> str:
        return f"GroupASHA: rungs {self.milestones}, stopped groups {sorted(self.stopped)}"

    # the algorithm (pure bookkeeping; the tests drive it with fake trials). Live hooks and the rebuild from history
    # share _report/_raise, so that a resumed sweep's rungs come out as the live scheduler made them
    def _report(self, trial_id: str, group: int, images_seen, value, diverged: bool, metric_name: str = "") -> None:
        if diverged:
            self.ended.setdefault(group, set()).add(trial_id)
        elif images_seen is not None:
            self._back(trial_id, group)  # reporting again: training again (an errored seed retried)
        self.record(trial_id, group, images_seen, value, metric_name)

    def _raise(self, trial_id: str, group: int) -> None:
        """The seed raised out of retries: +inf at every rung it had not reached; decided now (as Tune reports it)."""
        self.ended.setdefault(group, set()).add(trial_id)
        self.raised.setdefault(group, set()).add(trial_id)
        self.decide(group)

    def _back(self, trial_id: str, group: int) -> None:
        # a retried seed leaves `ended`: rungs decided while it counted as +inf stay decided (decide skips them),
        # the open ones wait for its value
        self.ended.get(group, set()).discard(trial_id)
        self.raised.get(group, set()).discard(trial_id)

    def record(self, trial_id: str, group: int, images_seen, value, metric_name: str = "") -> None:
        if images_seen is None:
            return
        v = value if isinstance(value, dict) else finite_or_inf(value)[0]
        for m in self.milestones:
            if m <= images_seen:
                vals = self.values.setdefault((m, group), {})
                if trial_id not in vals:
                    vals[trial_id] = v
                    if metric_name and (m == images_seen or m not in self.rung_names):
                        self.rung_names[m] = metric_name  # a report made at the rung itself names its metric
        self.decide(group)

    def _ended(self, group: int) -> set:
        errored = {tid for tid, t in self.trials.get(group, {}).items() if getattr(t, "status", None) == "ERROR"}
        return self.ended.get(group, set()) | errored

    def decide(self, group: int) -> None:
        """Make every rung decision of `group` whose seeds are all in, lowest rung first."""
        for m in self.milestones:
            if group in self.stopped:
                return
            if group in self.rung_means[m]:
                continue
            vals = self.values.get((m, group), {})
            gone = [tid for tid in self._ended(group) if tid not in vals]
            if len(vals) + len(gone) < self.n_seeds:
                return  # wait for the other seeds to reach this rung
            mean, ema = group_choice(list(vals.values()) + [math.inf] * len(gone))
            prev = [min(x, _BIG) for x in self.rung_means[m].values()]
            cutoff = float(np.percentile(prev, 100.0 / self.rf)) if prev else None
            self.rung_means[m][group] = mean
            stop = not math.isfinite(mean) or (cutoff is not None and mean > cutoff)
            if stop:
                self.stopped[group] = m
            if not self._replaying:
                log.info(self.decision_line(group, m, mean, cutoff, stop, ema))

    def decision_line(self, group: int, m: int, mean: float, cutoff, stop: bool, ema: str | None = None) -> str:
        """'configuration 2 stopped at 2,528 images: kid64_ddim10 0.31 vs cutoff 0.27' (or 'continues ...'); with
        scheduler.ema_rule best the EMA it was judged on follows the metric ('kid64_ddim10 (EMA 0.05) 0.31')."""
        num = lambda x: "inf" if x >= _BIG else f"{x:.4g}"
        which = f" (EMA {ema})" if ema else ""
        head = (f"configuration {group} {'stopped' if stop else 'continues'} at {m:,} images: "
                f"{self.rung_names.get(m) or 'rung score'}{which} {num(mean)}")
        why = " (a seed diverged, raised or was not finite)" if not math.isfinite(mean) else ""
        if cutoff is None:
            return head + why + " (first at this rung)"
        return head + why + (f" vs cutoff {num(cutoff)}" if stop else f" (cutoff {num(cutoff)})")

    def _seed(self) -> None:
        """Rebuild the rung records from the results so far (a resumed sweep), once."""
        if self._seeded:
            return
        self._seeded = True
        try:
            history = self.history()
        except Exception as e:  # never into Tune's restore (it would silently restart the experiment)
            warnings.warn(f"GroupASHA: could not rebuild the rung records ({e}); judging new results only")
            return
        before = sum(len(x) for x in self.rung_means.values())
        self._replaying = True
        try:
            for tid, g, imgs, value, ended in history:
                if imgs is None:  # raised out of retries, at this point of the history
                    if ended:
                        self._raise(tid, g)
                else:
                    self._report(tid, g, imgs, value, bool(ended))
        finally:
            self._replaying = False
        made = sum(len(x) for x in self.rung_means.values()) - before
        if history:
            log.info(f"ASHA rebuilt from {sum(r[2] is not None for r in history)} earlier report(s): {made} rung "
                     f"decision(s), not printed again; configuration(s) stopped: {sorted(self.stopped) or 'none'}")


# -- the searcher ------------------------------------------------------------------------------------------------

def _draw(kind: str, vals: list, rng: np.random.Generator):
    if kind == "choice":
        return vals[int(rng.integers(len(vals)))]
    if kind == "uniform":
        return float(rng.uniform(vals[0], vals[1]))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(vals[0]), math.log(vals[1]))))
    if kind == "randint":
        return int(rng.integers(vals[0], vals[1] + 1))  # inclusive
    raise ValueError(kind)


def optuna_distributions(space: dict) -> dict:
    import optuna.distributions as D

    out = {}
    for key, (kind, vals) in space.items():
        if kind == "choice":
            out[key] = D.CategoricalDistribution(vals)
        elif kind in ("uniform", "loguniform"):
            out[key] = D.FloatDistribution(vals[0], vals[1], log=kind == "loguniform")
        elif kind == "randint":
            out[key] = D.IntDistribution(vals[0], vals[1])
        else:
            raise UserError(f"space.{key}: optuna cannot search `{kind}` values: use `choice`")
    return out


def open_study(url: str, study_name: str, sweep_id: str, create: bool):
    """The sweep's Optuna study; refuses (one line) a study that belongs to another sweep."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise UserError(f"tracking.optuna_storage {url}: cannot open ({msg[:200]})") from None
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        if not create:
            raise UserError(f"Optuna study {study_name!r} is missing from {url}") from None
        study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize")
        study.set_user_attr("p2sweep.sweep_id", sweep_id)
        return study
    owner = study.user_attrs.get("p2sweep.sweep_id")
    if owner != sweep_id:
        raise UserError(f"Optuna study {study_name!r} in {url} belongs to another sweep (id {owner}, this sweep "
                        f"{sweep_id}): refusing to mix its trials into this one")
    return study


class GroupSearcher(Searcher):
    """Hands out configurations (grid x num_samples, random, or Optuna TPE) once per seed; see the module doc."""

    def __init__(self, space: dict, algorithm: str, num_samples: int, seeds: list, metric: str,
                 search_seed: int = 0, optuna_url: str = "", study_name: str = "", sweep_id: str = "",
                 max_concurrent: int = 0):
        super().__init__(metric=RUNG_SCORE, mode="min")  # in every report (Tune checks); the sweep metric is not
        self.sweep_metric = metric
        self.space, self.algorithm = space, algorithm
        self.seeds = list(seeds)
        self.search_seed = int(search_seed)
        self.optuna_url, self.study_name, self.sweep_id = optuna_url, study_name, sweep_id
        # concurrency is limited here, not by Tune's ConcurrencyLimiter: that wrapper drops the completion of a
        # trial it no longer counts as live (an errored trial retried on resume), which would never reach Optuna
        self.max_concurrent = int(max_concurrent)
        grid = [(k, vals) for k, (kind, vals) in space.items() if kind == "grid"]
        self.grid_keys = [k for k, _ in grid]
        self.grid_points = [list(p) for p in itertools.product(*[v for _, v in grid])] or [[]]
        self.n_configs = num_configs(space, algorithm, num_samples)
        self.groups: dict = {}   # group -> {"params", "optuna", "outcomes": {seed: (status, value)}, "steps", "told"}
        self.queue: list = []    # (group, seed) still to hand out
        self.trial_group: dict = {}  # trial_id -> (group, seed)
        self.next_group = 0
        self.adoptable: list = []  # Optuna trial numbers asked but never told or handed out (lost in a crash)
        self._checked = False
        self._study = None

    # state (Tune saves it with its experiment state, every ~10 s and at the end)
    def get_state(self) -> dict:
        return {k: getattr(self, k) for k in ("groups", "queue", "trial_group", "next_group")}

    def set_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str):
        # no Optuna I/O here: an exception inside Tune's restore makes Tune silently start the experiment afresh
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
        self._checked = False

    def reconcile(self, restored: dict, retry_errored: bool = False) -> int:
        """Make this searcher's record agree with the trials Tune restored ({trial_id: {"config", "status",
        "last_result"}}, from the experiment state Tune resumes). Tune saves the two in separate files, and copies
        them to the storage one by one: a driver killed in between leaves a searcher that handed out a trial Tune
        never saved (that replicate would never run: it counts as live, and the searcher as finished) or one that
        never heard of a trial Tune has, or of how it ended (its result would not count, its replicate could run
        twice, its Optuna trial stay RUNNING). Tune calls no searcher method for the trials it restores, so the
        outcome of one that ended (and that Tune will not run again) is taken from its last result here. No Optuna
        I/O (Tune's restore): the groups this completes are told at the next `suggest`. Returns how many
        replicates were put back in the queue."""
        requeue = []
        for tid in [t for t in self.trial_group if t not in restored]:
            g, seed = self.trial_group.pop(tid)
            if seed not in self.groups[g]["outcomes"]:
                requeue.append((g, seed))
        for tid, t in sorted(restored.items(), key=lambda kv: Replicate.of(kv[1]["config"]).group):
            rep = Replicate.of(t["config"])
            if rep.group < 0:
                continue
            if tid not in self.trial_group:
                if rep.group not in self.groups:  # handed out after the searcher's last save: the trial's values
                    self.groups[rep.group] = {"params": rep.params, "optuna": None, "outcomes": {}, "steps": {},
                                              "reported": [], "told": False}
                    self.queue += [(rep.group, s) for s in self.seeds]
                    self.next_group = max(self.next_group, rep.group + 1)
                self.trial_group[tid] = (rep.group, rep.seed)
            ended = t["status"] == "TERMINATED" or (t["status"] == "ERROR" and not retry_errored)
            outcomes = self.groups[rep.group]["outcomes"]
            if ended and rep.seed not in outcomes:
                outcomes[rep.seed] = self._outcome(t["last_result"], error=t["status"] == "ERROR")
        held = set(self.trial_group.values())
        self.queue = [q for q in requeue + self.queue if q not in held]
        self._checked = False
        return len(requeue)

    def _optuna_number(self, group: int) -> int | None:
        """The Optuna trial of a group; for a group rebuilt from a trial's config (`reconcile`), the RUNNING Optuna
        trial no other group holds with the same values (else a new one asked with them)."""
        grp = self.groups[group]
        if grp["optuna"] is None:
            import optuna

            held = {x["optuna"] for x in self.groups.values()}
            number = next((t.number for t in self.study.get_trials(deepcopy=False)
                           if t.state == optuna.trial.TrialState.RUNNING and t.number not in held
                           and t.params == grp["params"]), None)
            if number is None:  # its Optuna trial was never asked, or is gone: one with the group's own values
                self.study.enqueue_trial(grp["params"], skip_if_exists=False)
                number = self.study.ask(optuna_distributions(self.space)).number
            grp["optuna"] = number
        return grp["optuna"]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_study"] = None
        return d

    def __setstate__(self, state):
        _restore_state(self, state)

    @property
    def study(self):
        if self._study is None:
            self._study = open_study(self.optuna_url, self.study_name, self.sweep_id, create=True)
        return self._study

    def live(self) -> int:
        return sum(1 for g, seed in self.trial_group.values() if seed not in self.groups[g]["outcomes"])

    def find_adoptable(self) -> None:
        """Optuna trials still RUNNING that no group of ours holds were asked after Tune's last save: reuse them."""
        if self.algorithm != "optuna":
            return
        import optuna

        for g in [g for g, grp in self.groups.items() if grp["optuna"] is None]:
            self._optuna_number(g)  # a group rebuilt from its trial's config takes its own trial first
        held = {g["optuna"] for g in self.groups.values()}
        self.adoptable = sorted(t.number for t in self.study.get_trials(deepcopy=False)
                                if t.state == optuna.trial.TrialState.RUNNING and t.number not in held)

    # configurations
    def params_for(self, group: int) -> tuple[dict, int | None]:
        if self.algorithm == "optuna":
            return self._optuna_params()
        sample, gi = divmod(group, len(self.grid_points))
        params = dict(zip(self.grid_keys, self.grid_points[gi]))
        rng = np.random.default_rng([self.search_seed, group])
        for key, (kind, vals) in self.space.items():
            if kind != "grid":
                params[key] = _draw(kind, vals, rng)
        return params, None

    def _optuna_params(self) -> tuple[dict, int]:
        if self.adoptable:
            number = self.adoptable.pop(0)
            t = next(x for x in self.study.get_trials(deepcopy=False) if x.number == number)
            return dict(t.params), number
        t = self.study.ask(optuna_distributions(self.space))
        return dict(t.params), t.number

    def suggest(self, trial_id: str):
        if not self._checked:  # after a restore or a restart: Optuna trials a dead driver asked come back, and
            try:               # configurations whose seeds all ended (restored ones included) are told
                self.find_adoptable()
                self.retell()
                self._checked = True
            except Exception as e:  # the Optuna database is unreachable: ask again on Tune's next call
                warnings.warn(f"Optuna: could not read the study ({str(e).splitlines()[0][:160]})")
                return None
        if not self.queue and self.next_group >= self.n_configs:
            return Searcher.FINISHED  # before the concurrency limit: Tune must hear it even with trials live
        if self.max_concurrent and self.live() >= self.max_concurrent:
            return None
        if not self.queue:
            g = self.next_group
            try:
                params, number = self.params_for(g)
            except Exception as e:  # the Optuna database is unreachable: ask again on Tune's next call
                warnings.warn(f"Optuna: could not ask for a configuration ({str(e).splitlines()[0][:160]})")
                return None
            self.next_group += 1
            self.groups[g] = {"params": params, "optuna": number, "outcomes": {}, "steps": {}, "reported": [],
                              "told": False}
            self.queue = [(g, s) for s in self.seeds]
        g, seed = self.queue.pop(0)
        self.trial_group[trial_id] = (g, seed)
        return Replicate(group=g, seed=seed, params=self.groups[g]["params"]).config()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.trial_group:
            return
        g, seed = self.trial_group[trial_id]
        grp = self.groups[g]
        if grp["outcomes"].get(seed, ("",))[0] == "error" and (self.algorithm != "optuna" or not grp["told"]):
            del grp["outcomes"][seed]  # an errored trial retried with `resume --retry-errored` runs again
            grp["told"] = False
        if self.algorithm != "optuna":
            return
        rep = TrialReport.from_result(self.sweep_metric, result)
        step = rep.images_seen
        grp["steps"].setdefault(step, {})[seed] = rep.judged  # intermediate values: the rung's own metric
        if len(grp["steps"][step]) == len(self.seeds) and step not in grp["reported"]:
            grp["reported"].append(step)
            self._report(g, group_score(grp["steps"][step].values()), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.trial_group:
            return
        if result and not error:
            self.on_trial_result(trial_id, result)  # Tune skips on_trial_result for the report it answers STOP
        g, seed = self.trial_group[trial_id]
        grp = self.groups[g]
        grp["outcomes"][seed] = self._outcome(result, error)
        if len(grp["outcomes"]) == len(self.seeds):
            self.tell(g)
        self.retell()

    def _outcome(self, result: dict | None, error: bool = False) -> tuple[str, float | None]:
        """How a seed ended, from its last result: error, diverged, complete (with its value) or stopped."""
        if error or not result:
            return "error", None
        rep = TrialReport.from_result(self.sweep_metric, result)
        if not rep.final:
            return "stopped", rep.value
        # the final point always has the sweep metric (its EMA candidates with ema_rule best); with EMA candidates
        # a NaN of the tracked EMA alone is not a failure: the other EMAs still count
        value = (rep.judged if rep.rung_candidates and not rep.diverged else
                 math.inf if rep.failed_value or rep.value is None else rep.value)
        return ("diverged" if rep.failed_value else "complete"), value

    def verdict(self, group: int) -> tuple[str, float | None]:
        """("complete", mean) if every seed reached the end (+inf if one diverged), ("pruned", None) if one was
        stopped early, ("fail", None) if one raised."""
        outs = list(self.groups[group]["outcomes"].values())
        kinds = {k for k, _ in outs}
        if "error" in kinds:
            return "fail", None
        if "stopped" in kinds:
            return "pruned", None
        return "complete", group_score(v for _, v in outs)

    def tell(self, group: int) -> None:
        grp = self.groups[group]
        if grp["told"]:
            return
        if self.algorithm != "optuna":
            grp["told"] = True
            return
        import optuna

        kind, value = self.verdict(group)
        state = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                 "fail": optuna.trial.TrialState.FAIL}[kind]
        try:
            # skip_if_finished: a trial that finished before a driver crash may finish again after the resume
            self.study.tell(self._optuna_number(group), values=value if kind == "complete" else None, state=state,
                            skip_if_finished=True)
            grp["told"] = True
        except Exception as e:  # never into Tune (it would fail the trial or end the run); told on the next event
            warnings.warn(f"Optuna: could not tell trial {grp['optuna']} ({str(e).splitlines()[0][:160]})")

    def retell(self) -> None:
        """Tell Optuna every finished configuration it has not heard of (after a failed tell)."""
        for g, grp in self.groups.items():
            if not grp["told"] and len(grp["outcomes"]) == len(self.seeds):
                self.tell(g)

    def _report(self, group: int, value: float, step: int) -> None:
        import optuna

        number = self.groups[group]["optuna"]
        try:
            number = self._optuna_number(group)
            frozen = next((t for t in self.study.get_trials(deepcopy=False) if t.number == number), None)
            if frozen is None or frozen.state != optuna.trial.TrialState.RUNNING or \
                    step in frozen.intermediate_values:
                return
            compat.reopen_optuna_trial(self.study, frozen).report(min(value, _BIG), step)
        except Exception as e:  # an intermediate value is not worth ending the sweep for
            warnings.warn(f"Optuna: could not report to trial {number} ({str(e).splitlines()[0][:160]})")


def param_importance(url: str, study_name: str, minimum: int) -> dict:
    """Optuna's PED-ANOVA (Optuna 5's default importance evaluator) on the sweep's study, or a note saying why not.
    It uses finite COMPLETE trials only (under ASHA most configurations end PRUNED) and is asked for the importance
    of reaching the top quantile that holds 5 of them (Optuna's advice: at least 5 trials above the quantile)."""
    import math
    import warnings

    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = "PED-ANOVA (Optuna's default evaluator)"
    try:
        study = optuna.load_study(study_name=study_name, storage=url)
    except Exception as e:  # a missing or unreachable study: the report says so and goes on
        return {"evaluator": name, "complete": 0, "values": {},
                "note": f"parameter importance: no Optuna study ({(str(e).splitlines() or [type(e).__name__])[0]})"}
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and t.value is not None and math.isfinite(t.value)]
    if len(done) < minimum:
        return {"evaluator": name, "complete": len(done), "values": {},
                "note": f"parameter importance not shown: {len(done)} COMPLETE configuration(s) with a finite value, "
                        f"fewer than {minimum} (the evaluator uses COMPLETE trials only; ASHA-pruned and diverged "
                        "ones are left out)"}
    q = max(0.1, 5 / len(done))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            vals = optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(
                target_quantile=q))
        except Exception as e:
            return {"evaluator": name, "complete": len(done), "values": {},
                    "note": f"parameter importance failed: {(str(e).splitlines() or [type(e).__name__])[0]}"}
    if any("equal" in str(w.message) for w in caught):  # Optuna then returns equal shares, not importances
        return {"evaluator": name, "complete": len(done), "values": {},
                "note": f"parameter importance not shown: Optuna could not separate the parameters over {len(done)} "
                        "COMPLETE configurations (it would report equal importances)"}
    return {"evaluator": name, "complete": len(done), "values": {k: float(v) for k, v in vals.items()},
            "note": f"parameter importance: {name} over {len(done)} COMPLETE configurations with a finite value, "
                    f"importance of reaching the best {100 * q:.0f}%"}


class RootedSearchGenerator(SearchGenerator):
    """Tune's own wrapper around a Searcher, for a resumed sweep. Its saved state (`search_gen_state-*.json`) brings
    back the Experiment of the first run, storage included, and every trial created after the resume takes its
    folder from it: a moved or copied storage would have new trials written to the original. This keeps the
    storage the sweep is in now (as Tune itself does for the trials it restores)."""

    def __init__(self, searcher: Searcher, storage_fs_path: str, storage_filesystem, restored: dict | None = None,
                 retry_errored: bool = False):
        super().__init__(searcher)
        self._fs_path, self._fs = storage_fs_path, storage_filesystem
        # the trials of the experiment state Tune resumes ({trial_id: {config, status, last_result}})
        self._restored, self._retry_errored = restored, retry_errored

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        compat.reroot_search_generator(self, self._fs_path, self._fs)

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        if self._restored is None or not isinstance(self.searcher, GroupSearcher):
            return
        try:
            back = self.searcher.reconcile(self._restored, self._retry_errored)
        except Exception as e:  # never out of Tune's restore (it would start the experiment afresh)
            log.warning("p2sweep: the searcher could not be matched to Tune's saved trials (%s); resuming with "
                        "its own record", str(e).splitlines()[0][:200])
            return
        # Tune counts the trials it created and stops asking at num_samples: count the replicates it has (a sweep
        # resumed before this fix may hold two trials of one replicate)
        self._counter = len({Replicate.of(t["config"]).key for t in self._restored.values()})
        self._finished = False  # the searcher says FINISHED again once it is
        if back:
            log.warning("%d trial(s) the searcher had handed out were not in Tune's saved state (the driver died "
                        "between two saves): they run again", back)
