"""A local ``prefect server`` and ``prefect worker`` processes, started and always stopped.

Every process gets its own session, so a terminal's Ctrl-C reaches only the command that
started them; that command then stops them here. Stopping walks the whole process tree
(a worker's flow runs sit in their own process groups) and also every process that carries
this group's marker variable, so nothing re-parented to init survives either.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from wanda_pipeline.errors import ConfigError, RunError

MARKER = "WANDA_SCALEOUT_ID"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == marker:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def stop_tree(procs: list[subprocess.Popen], marker: str | None = None, grace: float = 20.0) -> None:
    """SIGTERM processes, their descendants and every process marked ``marker``; SIGKILL what is left."""
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
    if marker:
        found.update({p.pid: p for p in _marked(marker)})
    for p in found.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=grace)
    if marker:  # children born while we were signalling
        alive += [p for p in _marked(marker) if p.pid not in {q.pid for q in alive}]
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalPrefectServer:
    """``prefect server start`` on 127.0.0.1 and a free port, with its own PREFECT_HOME in a temp dir."""

    def __init__(self, startup_timeout: float = 180.0):
        self.startup_timeout = startup_timeout
        self.api_url = ""
        self._proc: subprocess.Popen | None = None
        self._home: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> LocalPrefectServer:
        import requests

        self._home = tempfile.TemporaryDirectory(prefix="wanda-prefect-server-")
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env.update(PREFECT_HOME=self._home.name, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
        self._marker = uuid.uuid4().hex
        env[MARKER] = self._marker
        self._log = Path(self._home.name) / "server.log"
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RunError(f"the local Prefect server exited with {self._proc.returncode}:\n{_tail(self._log)}")
                try:
                    if requests.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                if time.time() > deadline:
                    raise RunError(f"the local Prefect server did not answer within {self.startup_timeout:.0f}s:\n"
                                   f"{_tail(self._log)}")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            stop_tree([self._proc], self._marker)
            self._proc = None
        if self._home is not None:
            self._home.cleanup()
            self._home = None


def ensure_process_pool(pool: str, create: bool) -> None:
    """The work pool must exist; create it (type ``process``) when ``create``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return
        except ObjectNotFound:
            if not create:
                raise ConfigError(f"work pool {pool!r} does not exist on the Prefect server; create it with "
                                  f"`prefect work-pool create {pool} --type process` and start workers on it") from None
        client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))


class WorkerGroup:
    """N ``prefect worker start --type process --limit 1`` processes polling one pool.

    ``envs[i]`` is added to worker i's environment (its CUDA_VISIBLE_DEVICES, for instance);
    the flow runs a worker starts inherit it.
    """

    def __init__(self, api_url: str, pool: str, envs: list[dict[str, str]], poll_seconds: int = 2):
        self.api_url, self.pool, self.envs, self.poll_seconds = api_url, pool, envs, poll_seconds
        self.procs: list[subprocess.Popen] = []
        self._logs: tempfile.TemporaryDirectory | None = None
        self.marker = uuid.uuid4().hex

    def __enter__(self) -> WorkerGroup:
        self._logs = tempfile.TemporaryDirectory(prefix="wanda-workers-")
        try:
            for i, extra in enumerate(self.envs):
                env = dict(os.environ, PREFECT_API_URL=self.api_url,
                           PREFECT_WORKER_QUERY_SECONDS=str(self.poll_seconds), **{MARKER: self.marker}, **extra)
                with open(Path(self._logs.name) / f"worker-{i}.log", "wb") as log:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool, "--type", "process",
                         "--limit", "1", "--name", f"{self.pool}-{i}"],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                        start_new_session=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def log_tail(self, i: int, lines: int = 30) -> str:
        return _tail(Path(self._logs.name) / f"worker-{i}.log", lines) if self._logs else ""

    def __exit__(self, *exc) -> None:
        stop_tree(self.procs, self.marker)
        self.procs = []
        if self._logs is not None:
            self._logs.cleanup()
            self._logs = None
