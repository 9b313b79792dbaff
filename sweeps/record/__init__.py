"""The sweep's record: the sweep file as parsed (`spec`), the sweep as stored (`meta`, p2sweep.json), a trial's
identity and training config (`replicate`) and its report (`trial_report`), the baselines evaluated beside the
trials (`baselines`). May import p2core, sweeps.storage and sweeps.compat only."""
