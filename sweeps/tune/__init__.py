"""The Ray adapters: starting Ray, the trainable, GroupASHA and the searcher, driver tasks, the console, run/resume.
May import record, storage, tracking, results, compat and p2core."""
