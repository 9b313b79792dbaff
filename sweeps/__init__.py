"""p2sweep's sweep layer: Ray Tune, Optuna and MLflow around the p2core trainer, and the `p2sweep` CLI.

Its folders are its layers, each importing only those below it (docs/architecture.md; tests/test_layout.py checks):
storage -> record -> results -> tracking -> tune -> commands -> cli, with `compat` (the private internals of Ray,
Optuna and MLflow that p2sweep relies on) beside them all.
"""
import importlib
import importlib.abc
import importlib.util
import sys

# Where modules lived before the subpackages (p2sweep 0.1): Ray Tune's tuner.pkl of a sweep started then names its
# tracker, scheduler, searcher and trainable by these, so `resume` of such a sweep finds them under the old names.
MOVED = {f"sweeps.{old}": f"sweeps.{new}" for old, new in {
    'sweep_commands': 'commands.sweep',
    'model_commands': 'commands.model',
    'spec': 'record.spec',
    'meta': 'record.meta',
    'report': 'record.trial_report',
    'tune_state': 'storage.tune_state',
    'ray_env': 'tune.ray_env',
    'runner': 'tune.runner',
    'trainable': 'tune.trainable',
    'schedulers': 'tune.schedulers',
    'driver_tasks': 'tune.driver_tasks',
    'console': 'tune.console',
    'baselines': 'record.baselines',
    'analysis': 'results.analysis',
    'report_data': 'results.report_data',
    'report_figures': 'results.report_figures',
    'report_render': 'results.report_render',
    'report_page': 'results.report_page',
    'plots': 'results.plots',
    'table': 'results.table',
}.items()}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module that now holds it (the same object, its own spec kept)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__  # the import system sets the alias's spec on it next: put it back then
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec


sys.meta_path.insert(0, _Moved())  # first: an old name is never a module of its own now
