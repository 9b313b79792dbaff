"""The `p2sweep` commands (imported by sweeps.cli only when one runs). May import every other subpackage of sweeps and
p2core; nothing imports them but the CLI."""
