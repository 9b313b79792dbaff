"""Paths and URIs (a folder or s3://) read and written the same way (`fs`), and Ray Tune's saved state files
(`tune_state`). May import p2core.errors and the libraries only (no Ray)."""
