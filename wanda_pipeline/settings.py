"""Where the library finds local data and keeps its cache: environment settings only."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "WANDA_DATA_DIR"
CACHE_DIR_ENV = "WANDA_CACHE_DIR"
# Prefect's default (20 s) for its embedded server to start expires on a busy machine.
PREFECT_STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PREFECT_STARTUP_TIMEOUT_S = 120


def service_defaults(env: dict | None = None) -> None:
    """Settings of the services underneath that fit a busy machine; a user's own value is kept.
    Applied when the package is imported, before Prefect reads its settings."""
    env = os.environ if env is None else env
    env.setdefault(PREFECT_STARTUP_TIMEOUT_ENV, str(PREFECT_STARTUP_TIMEOUT_S))


def data_dir() -> Path | None:
    """The local data folder (``$WANDA_DATA_DIR``), or None when unset."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    value = os.environ.get(CACHE_DIR_ENV)
    path = Path(value).expanduser() if value else Path.home() / ".cache" / "wanda-pipeline"
    path.mkdir(parents=True, exist_ok=True)
    return path
