"""Where the library finds local data and keeps its cache: environment settings only."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "WANDA_DATA_DIR"
CACHE_DIR_ENV = "WANDA_CACHE_DIR"


def data_dir() -> Path | None:
    """The local data folder (``$WANDA_DATA_DIR``), or None when unset."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    value = os.environ.get(CACHE_DIR_ENV)
    path = Path(value).expanduser() if value else Path.home() / ".cache" / "wanda-pipeline"
    path.mkdir(parents=True, exist_ok=True)
    return path
