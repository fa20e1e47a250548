"""How the CLI reports a fault: one exit code per kind (:mod:`wanda_pipeline.fault_map`), no library
traceback on the console (Prefect's and MLflow's loggers print one for every failed task), and a
last line that names the MLflow run the fault ended, so the user can find or close it."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from wanda_pipeline.errors import EXIT_INTERNAL, WandaPipelineError, run_line

_PREFECT_COMMANDS = {"run", "sweep", "serve", "deploy"}
_MLFLOW_COMMANDS = _PREFECT_COMMANDS | {"promote"}


class _NoTraceback(logging.Formatter):
    """A console formatter that drops the record's traceback (the CLI reports the fault itself)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "stack_info": None})
        return self.inner.format(record)


def _console_handlers() -> Iterator[logging.Handler]:
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("prefect", "mlflow")]
    for logger in [logging.getLogger(), *map(logging.getLogger, names)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler):  # not Prefect's API handler: the server keeps all
                yield handler


@contextmanager
def quiet_libraries(command: str, tracking: bool, debug: bool) -> Iterator[None]:
    """While a command runs, Prefect's and MLflow's console logs carry no tracebacks (``--debug``
    keeps them). The libraries are imported first, as the command would, so their handlers exist."""
    if debug or (command not in _MLFLOW_COMMANDS and not tracking):
        yield
        return
    if command in _PREFECT_COMMANDS:
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()  # Prefect's console handlers, as its first flow call would make them
    import mlflow  # noqa: F401 (sets up MLflow's)

    wrapped = {}
    for handler in _console_handlers():
        if not isinstance(handler.formatter, _NoTraceback):
            wrapped[handler] = handler.formatter
            handler.setFormatter(_NoTraceback(handler.formatter))
    try:
        yield
    finally:
        for handler, formatter in wrapped.items():
            handler.setFormatter(formatter)


def embedded_server_running() -> bool:
    if "prefect.server.api.server" not in sys.modules:
        return False
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer().server_process is not None


def quiet_server_stop() -> None:
    """The embedded Prefect server this command started stops at exit and logs a line saying so;
    after a fault, that line would come after the CLI's last one."""
    if embedded_server_running():
        logging.getLogger("prefect").setLevel(logging.WARNING)


def report(exc: BaseException, debug: bool, started_server: bool) -> int:
    """Print the fault (mapped to its kind) and return the exit code; a bug prints one line."""
    from wanda_pipeline.fault_map import classify, unexpected

    error = exc if isinstance(exc, WandaPipelineError) else classify(exc) or unexpected(exc)
    if started_server:
        quiet_server_stop()
    if debug:
        traceback.print_exception(exc)
    if error is None:
        print(f"internal error: {type(exc).__name__}: {exc} (a bug; rerun with --debug or WANDA_DEBUG=1 for the "
              f"traceback and report it)", file=sys.stderr)
    else:
        print(f"error: {error}", file=sys.stderr)
    line = run_line(exc)
    if line:
        print(line, file=sys.stderr)
    return EXIT_INTERNAL if error is None else error.exit_code
