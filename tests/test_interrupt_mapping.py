"""A signal that a library turns into its own exception still ends the run as interrupted
(exit 130/143), not as a failed stage (exit 5). Prefect installs its own SIGTERM handler during
a flow run; a SIGTERM landing while its task engine sets up comes out as
``ValueError("Task run is not set")`` raised while handling Prefect's ``TerminationSignal``."""

import signal

import pytest
from prefect.exceptions import TerminationSignal

from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.errors import Interrupted, RunError, interrupt_behind, note_signal, stage_failure
from wanda_pipeline.run import execute


def prefect_style_failure() -> ValueError:
    """The exception Prefect's task engine raised in CI: a ValueError whose context is the signal."""
    try:
        try:
            raise TerminationSignal(signal.SIGTERM)
        except TerminationSignal:
            raise ValueError("Task run is not set")  # noqa: B904 (as Prefect does)
    except ValueError as exc:
        return exc


def chained(*links: BaseException) -> BaseException:
    """links[0] raised from links[1] raised from ... (explicit causes)."""
    for outer, inner in zip(links, links[1:], strict=False):
        outer.__cause__ = inner
    return links[0]


@pytest.fixture(autouse=True)
def no_recorded_signal():
    note_signal(None)
    yield
    note_signal(None)


def test_prefects_termination_signal_behind_a_value_error_is_sigterm():
    exc = prefect_style_failure()
    assert isinstance(exc.__context__, TerminationSignal)
    assert interrupt_behind(exc) == signal.SIGTERM
    out = stage_failure("evaluate", exc)
    assert isinstance(out, Interrupted) and out.exit_code == 143


@pytest.mark.parametrize("behind, code", [
    (Interrupted(signal.SIGTERM), 143),
    (Interrupted(signal.SIGINT), 130),
    (KeyboardInterrupt(), 130),
    (TerminationSignal(signal.SIGINT), 130),
])
def test_the_signal_is_found_several_links_down_either_as_cause_or_context(behind, code):
    by_cause = chained(RuntimeError("outer"), OSError("middle"), behind)
    by_context = RuntimeError("outer")
    by_context.__cause__ = OSError("an unrelated cause")
    by_context.__context__ = behind
    for exc in (by_cause, by_context):
        out = stage_failure("prune", exc)
        assert isinstance(out, Interrupted) and out.exit_code == code


class SignalledError(Exception):
    """An ordinary library error that happens to carry a ``signal`` number (a dead subprocess)."""

    def __init__(self):
        super().__init__("child died")
        self.signal = signal.SIGKILL


def test_an_ordinary_error_stays_a_stage_failure_naming_the_stage():
    for exc in (ValueError("x" * 2000), SignalledError(), chained(RuntimeError("a"), SignalledError())):
        out = stage_failure("quantize", exc)
        assert type(out) is RunError and out.exit_code == 5
        assert str(out).startswith(f"stage 'quantize' failed: {type(exc).__name__}: ")
    assert len(str(stage_failure("q", ValueError("x" * 2000)))) == len("stage 'q' failed: ValueError: ") + 500


def test_a_recorded_signal_wins_and_a_cycle_ends():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert interrupt_behind(a) is None
    note_signal(signal.SIGTERM)
    out = stage_failure("load", a)
    assert isinstance(out, Interrupted) and out.exit_code == 143


def test_the_run_path_maps_every_stage_through_it():
    spec = PipelineSpec(model={"source": "x"}, pruner={"name": "wanda"})

    def prefect_like_stage(name, fn, *args, cache_key=None):
        raise prefect_style_failure()

    with pytest.raises(Interrupted) as info:
        execute(spec, run_stage=prefect_like_stage)
    assert info.value.exit_code == 143

    def failing_stage(name, fn, *args, cache_key=None):
        raise ValueError("disk on fire")

    with pytest.raises(RunError, match="stage 'preflight' failed: ValueError: disk on fire"):
        execute(spec, run_stage=failing_stage)


@pytest.mark.parametrize("raised, code", [(prefect_style_failure, 143),
                                          (lambda: RunError("x"), 5),
                                          (lambda: chained(RunError("wrapped"), TerminationSignal(signal.SIGINT)), 130),
                                          (lambda: ValueError("a bug"), 1)])
def test_the_cli_reports_a_hidden_interrupt_as_interrupted(monkeypatch, capsys, raised, code):
    from wanda_pipeline import cli

    def command(_args):
        raise raised()

    monkeypatch.setattr(cli, "cmd_plugins", command)
    assert cli.main(["plugins"]) == code
    assert ("interrupted" in capsys.readouterr().err) == (code in (130, 143))
