"""Error types. Each carries the CLI exit code, so a script can tell a bad config
from a broken plugin from a failed run."""

from __future__ import annotations


class WandaPipelineError(Exception):
    exit_code = 1


class ConfigError(WandaPipelineError):
    """Bad user input: pipelines.yaml, CLI flags, sparsity settings."""

    exit_code = 2


class PluginError(WandaPipelineError):
    """An unknown, broken or crashing plugin."""

    exit_code = 3


class DataError(WandaPipelineError):
    """Missing model or calibration/evaluation data."""

    exit_code = 4


class RunError(WandaPipelineError):
    """A stage failed while running."""

    exit_code = 5


class TrackingError(WandaPipelineError):
    """MLflow unreachable, or registration failed."""

    exit_code = 6
