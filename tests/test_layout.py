"""The folders of sweeps/ are its layers: each subpackage imports only the ones below it (its __init__ docstring
says which), p2core imports nothing of sweeps, and a sweep started before the subpackages still unpickles."""
import ast
import os
import pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# subpackage -> the parts of sweeps it may import (besides itself); "" is a top-level module (cli, compat)
MAY_IMPORT = {
    "compat": set(),
    "storage": {"compat"},
    "record": {"storage", "compat"},
    "results": {"record", "storage", "compat"},
    "tracking": {"results", "record", "storage", "compat"},
    "tune": {"tracking", "results", "record", "storage", "compat"},
    "commands": {"tune", "tracking", "results", "record", "storage", "compat"},
    "cli": {"commands", "record", "storage", "compat"},
}


def _part(module: str) -> str:
    """'sweeps.tune.runner' -> 'tune'; 'sweeps.cli' -> 'cli'."""
    return module.split(".")[1]


def _imports(path: str, module: str) -> set:
    """The sweeps modules that `path` (module `module`) imports, at the top or inside functions."""
    pkg = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target + "." + a.name for a in node.names] if not node.module or node.level else [target]
            out.update(n for n in names + [target] if n.startswith("sweeps."))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sweeps."))
    return out


def _modules():
    for d, _, files in os.walk(os.path.join(ROOT, "sweeps")):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                rel = os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")
                yield p, rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for path, module in _modules():
        if module == "sweeps":
            continue
        own = _part(module)
        for target in _imports(path, module):
            if target == "sweeps" or _part(target) == own:
                continue
            if _part(target) not in MAY_IMPORT[own]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_subpackage_says_what_it_may_import():
    for part in MAY_IMPORT:
        init = os.path.join(ROOT, "sweeps", part, "__init__.py")
        if os.path.isdir(os.path.dirname(init)):
            doc = ast.get_docstring(ast.parse(open(init).read())) or ""
            assert "May import" in doc, init


def test_p2core_imports_nothing_of_sweeps_ray_mlflow_or_optuna():
    for d, _, files in os.walk(os.path.join(ROOT, "p2core")):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(d, f)).read())
                for node in ast.walk(tree):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                    for n in names:
                        assert n.split(".")[0] not in ("sweeps", "ray", "mlflow", "optuna"), (f, n)


def test_a_pickle_of_a_sweep_started_before_the_subpackages_still_loads():
    """Tune's tuner.pkl names the classes of the tracker, scheduler and trainable by module: the old module names
    (sweeps.schedulers, sweeps.tracking, sweeps.trainable, ...) still resolve, to the same objects."""
    from sweeps.tune.schedulers import GroupASHA
    from sweeps.tune.trainable import run_trial

    old = pickle.dumps(GroupASHA, protocol=0).replace(b"sweeps.tune.schedulers", b"sweeps.schedulers")
    assert b"sweeps.schedulers" in old and pickle.loads(old) is GroupASHA
    old = pickle.dumps(run_trial, protocol=0).replace(b"sweeps.tune.trainable", b"sweeps.trainable")
    assert pickle.loads(old) is run_trial
    from sweeps.tracking.callback import MLflowTracker

    old = pickle.dumps(MLflowTracker, protocol=0).replace(b"sweeps.tracking.callback", b"sweeps.tracking")
    assert pickle.loads(old) is MLflowTracker  # an old name that is a package now
    import sweeps.tune.schedulers as real

    assert real.__spec__.name == "sweeps.tune.schedulers"  # the alias leaves the module's own spec alone
