"""The sweep's results read back from the storage (no Ray import): trials, rows and the one ranking, analysis, the
report. May import record, storage, compat and p2core."""
