"""Prefect's embedded server, started one process at a time.

With no PREFECT_API_URL, each ``run`` and ``sweep`` starts a temporary server on the SQLite file
in PREFECT_HOME, migrating it first. Two commands starting together on one PREFECT_HOME race in
that migration, so the start is serialised with a file lock there; a started server is reused.
"""

from __future__ import annotations

import os
from pathlib import Path

from wanda_pipeline.errors import TrackingError
from wanda_pipeline.settings import PREFECT_STARTUP_TIMEOUT_ENV, PREFECT_STARTUP_TIMEOUT_S


def startup_timeout() -> int:
    """The user's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, else one that fits a busy machine."""
    value = os.environ.get(PREFECT_STARTUP_TIMEOUT_ENV)
    try:
        return max(1, int(float(value))) if value else PREFECT_STARTUP_TIMEOUT_S
    except ValueError:
        return PREFECT_STARTUP_TIMEOUT_S


def start_embedded_server() -> None:
    """Start the embedded server now (nothing to do when PREFECT_API_URL names a server)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from filelock import FileLock, Timeout
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(home / ".wanda-pipeline-server-start.lock"))
    try:
        with lock.acquire(timeout=3 * startup_timeout()):
            SubprocessASGIServer().start(timeout=startup_timeout())
    except Timeout:
        raise TrackingError(f"other processes kept {lock.lock_file} for {3 * startup_timeout()} s while starting "
                            f"Prefect's embedded server; set PREFECT_API_URL to a running server "
                            f"(`prefect server start`)") from None
