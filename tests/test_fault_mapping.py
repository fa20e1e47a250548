"""The fault table (wanda_pipeline/fault_map.py, docs/failures.md): each library's exception, produced
for real where it can be on cue (a corrupt file, a dead port, /dev/full, a huge allocation), gets
its documented exit code, and the message names the file or URL and the fix. The entry points:
tests/test_fault_entry_points.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prefect.logging.configuration import ensure_logging_setup

from tests.fault_producers import (
    bad_json,
    bad_yaml,
    cannot_read,
    caught,
    connection_refused,
    corrupt_safetensors,
    corrupt_tokenizer,
    cpu_out_of_memory,
    cuda_out_of_memory,
    disk_full,
    hub_offline,
    missing_file,
    mlflow_bad_scheme,
    mlflow_rest_error,
    mlflow_server_down,
    not_utf8,
    prefect_api_down,
    prefect_server_slow,
    quota,
    read_only_fs,
    silent_server,
    tracking_timeout,
    truncated_gguf,
)
from wanda_pipeline.errors import DataError, OutputError, RunError, TrackingError, stage_failure
from wanda_pipeline.fault_map import FAULTS, classify, unexpected

# Prefect's console handler keeps the stream it was made with: make it now, not inside a test whose
# captured stderr is closed afterwards (later tests would see "--- Logging error ---" tracebacks).
ensure_logging_setup()

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


def test_the_table_is_in_the_failures_doc():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "failures.md").read_text()
    missing = [f.name for f in FAULTS if f"`{f.name}`" not in doc]
    assert missing == []


if os.name != "posix":  # /dev/full and the errno rows need a POSIX system
    pytestmark = pytest.mark.skip("POSIX only")
