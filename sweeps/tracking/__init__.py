"""MLflow: the client (`client`, bounded), the sweep's runs (`runs`), the Tune callback that writes them (`callback`),
repair after trouble (`repair`), the comparison view (`view`). May import record,
storage, results, compat and p2core."""


def __getattr__(name):
    # a sweep started before the subpackages pickled its tracker as sweeps.tracking.MLflowTracker (lazy: importing
    # this package must not import Ray)
    if name == "MLflowTracker":
        from .callback import MLflowTracker

        return MLflowTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
