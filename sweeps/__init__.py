"""p2sweep's sweep layer: Ray Tune, Optuna and MLflow around the p2core trainer, and the `p2sweep` CLI."""
