"""The shared bench's PPO settings (../shared/bench/README.md), defined once for every bench script.

The scripts run in two venvs (ours and TRL 1.12's), so this module imports nothing but argparse.
`python scripts/X.py` puts scripts/ on sys.path, so each script imports it as `bench_settings`.
"""

from __future__ import annotations

import argparse

# flag -> (type, default): batch 8, 4 PPO epochs, 24 tokens, 512 episodes, lr 3e-4, kl 0.05, T 0.7
SETTINGS: dict[str, tuple[type, float | int]] = {
    "--batch-size": (int, 8),
    "--ppo-epochs": (int, 4),
    "--response-length": (int, 24),
    "--episodes": (int, 512),
    "--lr": (float, 3e-4),
    "--kl-coef": (float, 0.05),
    "--temperature": (float, 0.7),
}


def add_bench_settings(ap: argparse.ArgumentParser) -> None:
    """The settings as command-line flags with the bench's defaults."""
    for flag, (kind, default) in SETTINGS.items():
        ap.add_argument(flag, type=kind, default=default)


def bench_settings_argv(a: argparse.Namespace) -> list[str]:
    """The settings in `a` as flags, to hand a child script the same run."""
    argv: list[str] = []
    for flag in SETTINGS:
        argv += [flag, str(getattr(a, flag[2:].replace("-", "_")))]
    return argv
