"""Paths and URIs (a folder or s3://) read and written the same way (`fs`), what a path storage holds beside its
sweeps (`layout`), a trial's own files (`trial_files`) and Ray Tune's saved state files (`tune_state`). May import
p2core.errors and the libraries only (no Ray)."""
