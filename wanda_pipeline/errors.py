"""Error types and the exit codes they map to (docs/failures.md has the full table).

0 ok, 1 internal error (a bug: please report it), 2 config, 3 plugin, 4 data or model files,
5 a stage failed while running, 6 tracking or registry (nothing was promoted), 7 output or
environment (folder, disk, device), 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_INTERNAL = 1


class WandaPipelineError(Exception):
    exit_code = EXIT_INTERNAL


class ConfigError(WandaPipelineError):
    """Bad user input: pipelines.yaml, CLI flags, sparsity settings."""

    exit_code = 2


class PluginError(WandaPipelineError):
    """An unknown, broken or crashing plugin."""

    exit_code = 3


class DataError(WandaPipelineError):
    """Missing or corrupt model or calibration/evaluation data."""

    exit_code = 4


class RunError(WandaPipelineError):
    """A stage failed while running."""

    exit_code = 5


class TrackingError(WandaPipelineError):
    """MLflow unreachable or not writable, or registration/promotion failed (fail closed)."""

    exit_code = 6


class OutputError(WandaPipelineError):
    """The output folder, disk space or device cannot be used as asked."""

    exit_code = 7


class PreflightError(WandaPipelineError):
    """Several problems found before any heavy work. Exit code: the lowest of theirs."""

    def __init__(self, problems: list[WandaPipelineError]):
        self.problems = problems
        self.exit_code = min(p.exit_code for p in problems)
        lines = "\n".join(f"  - [{type(p).__name__}] {p}" for p in problems)
        super().__init__(f"preflight found {len(problems)} problem(s); stopped before any model load:\n{lines}")


_signals_received: list[int] = []


def note_signal(signum: int | None) -> None:
    """Record (or, with None, forget) a SIGINT/SIGTERM, so a library that turns the interrupt
    into an ordinary exception cannot make it look like a stage failure."""
    _signals_received.clear()
    if signum is not None:
        _signals_received.append(signum)


def signal_received() -> int | None:
    return _signals_received[-1] if _signals_received else None


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a KeyboardInterrupt so that libraries do not swallow it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def interrupt_behind(exc: BaseException) -> int | None:
    """The signal behind ``exc``, if an interrupt is among its causes and contexts: ours, a bare
    KeyboardInterrupt, or an orchestrator's signal exception (Prefect's ``TerminationSignal``
    carries ``.signal``). Prefect installs its own SIGTERM handler during a flow run, and a
    SIGTERM landing while its task engine sets up surfaces as ``ValueError("Task run is not
    set")`` with the TerminationSignal as context, before our handler has seen the signal."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, Interrupted):
            return e.signum
        if isinstance(e, KeyboardInterrupt):
            return signal.SIGINT
        if not isinstance(e, Exception) and isinstance(getattr(e, "signal", None), int):
            return e.signal
        todo += [e.__cause__, e.__context__]
    return None


def stage_failure(stage: str, exc: Exception, hint: str | None = None) -> WandaPipelineError | Interrupted:
    """What a library's exception inside ``stage`` becomes: the interrupt it hides (exit 130/143),
    else the row of :mod:`wanda_pipeline.fault_map` it matches (the file or URL named, the fix),
    else a :class:`RunError` naming the stage (exit 5). ``hint``: the stage's input, named when
    the exception does not say which file it is about."""
    signum = signal_received() or interrupt_behind(exc)
    if signum is not None:
        return Interrupted(signum)
    from wanda_pipeline.fault_map import classify, unexpected

    return classify(exc, stage, hint) or unexpected(exc, stage)


def note_run(exc: BaseException, run_id: str, uri: str, ended: str | None) -> None:
    """Remember on ``exc`` the MLflow run it ended (``ended``: the status set, or None when the
    store did not answer), so the CLI's last line can name it. The innermost run is kept."""
    if getattr(exc, "mlflow_run", None) is None:
        try:
            exc.mlflow_run = (run_id, uri, ended)
        except AttributeError:  # an exception type with __slots__
            pass


def run_line(exc: BaseException) -> str | None:
    """The CLI's last line for a fault inside an MLflow run: which run, and how to close it."""
    run = getattr(exc, "mlflow_run", None)
    if not run:
        return None
    run_id, uri, ended = run
    if ended:
        return f"mlflow run {run_id} ({uri}) ended {ended}"
    return (f"mlflow run {run_id} ({uri}) could not be ended and may show RUNNING; once the store answers, end it "
            f"with: python -c \"import mlflow; mlflow.MlflowClient('{uri}').set_terminated('{run_id}', 'FAILED')\"")
