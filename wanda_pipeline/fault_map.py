"""The ONE table from the libraries' exceptions to this project's exit codes (docs/failures.md).

Every entry point goes through :func:`classify`: a stage's exception (``errors.stage_failure``),
the MLflow wrapper, and the CLI's last resort. A row matches an exception, or any of its causes
and contexts, by class name (no library is imported here), by errno, or by the library whose
code raised it; the message names the file or URL involved and the fix. What no row matches is
a failed stage (5) inside a stage; outside one, a library's own exception class is that
library's failure (5), and anything else is a bug (1): exit 1 means a bug in this project.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from dataclasses import dataclass

from wanda_pipeline.errors import DataError, OutputError, RunError, TrackingError, WandaPipelineError
from wanda_pipeline.fault_where import chain, is_a, raised_by, where


def _errno(*codes: int) -> Callable[[BaseException], bool]:
    return lambda e: isinstance(e, OSError) and e.errno in codes


def _disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as the text a Rust library (safetensors, tokenizers) puts in its own error."""
    text = str(e)
    return _errno(errno.ENOSPC, errno.EDQUOT)(e) or any(
        t in text for t in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122"))


@dataclass(frozen=True)
class Fault:
    """One row: which exceptions, the code they get, what happened and what to do."""

    name: str
    error: type[WandaPipelineError]
    matches: Callable[[BaseException], bool]
    what: str
    fix: str
    stages: frozenset[str] | None = None  # only inside these stages (None: anywhere)


def _prefect_api(e: BaseException) -> bool:
    text = str(e)
    return ("Failed to reach API" in text or "ephemeral Prefect API server" in text
            or (is_a(e, "ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError", "PoolTimeout")
                and raised_by(e, "prefect")))


def _connection(e: BaseException) -> bool:
    return isinstance(e, (ConnectionError, TimeoutError)) or is_a(
        e, "requests.exceptions.ConnectionError", "requests.exceptions.Timeout", "MaxRetryError",
        "NewConnectionError", "ReadTimeoutError", "ConnectTimeoutError")


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or is_a(e, "OutOfMemoryError") or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


_HUB = ("huggingface_hub.errors.LocalEntryNotFoundError", "huggingface_hub.errors.RepositoryNotFoundError",
        "huggingface_hub.errors.EntryNotFoundError", "huggingface_hub.errors.RevisionNotFoundError",
        "huggingface_hub.errors.GatedRepoError", "huggingface_hub.errors.HfHubHTTPError",
        "huggingface_hub.errors.OfflineModeIsEnabled", "datasets.exceptions.DatasetNotFoundError")
_READING = frozenset({"preflight", "load", "calibrate", "evaluate", "evaluate-dense"})
_PARSING = _READING | {"prune"}  # prune reads its checkpoint manifests

# Order matters: the first row that matches any link of the chain wins.
FAULTS: list[Fault] = [
    Fault("disk-full", OutputError, _disk_full,
          "no space left on the device (or quota exceeded)",
          "free space there, or write elsewhere (save path, TMPDIR for temporary files, WANDA_CACHE_DIR)"),
    Fault("read-only-filesystem", OutputError, _errno(errno.EROFS), "the file system is read-only",
          "write to a writable folder"),
    Fault("prefect-api-unreachable", TrackingError, _prefect_api,
          "the Prefect API does not answer (or the embedded server did not start)",
          "start `prefect server start --host 127.0.0.1` and set PREFECT_API_URL to it, or unset PREFECT_API_URL "
          "to use the embedded server; on a busy machine raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"),
    Fault("mlflow-unsupported-uri", TrackingError,
          lambda e: is_a(e, "UnsupportedModelRegistryStoreURIException")
          or (is_a(e, "MlflowException") and "registered tracking store" in str(e)),
          "the MLflow tracking URI has a scheme MLflow does not support",
          "set tracking.uri (--tracking-uri, MLFLOW_TRACKING_URI) to sqlite:///ABSOLUTE/PATH.db or http://HOST:PORT"),
    Fault("tracking-unreachable", TrackingError,
          lambda e: is_a(e, "mlflow.exceptions.MlflowException") and any(_connection(c) for c in chain(e)),
          "the MLflow tracking server does not answer",
          "start it (`mlflow server --host 127.0.0.1 --port 5000`), or set tracking.uri to a sqlite:/// file; "
          "nothing was promoted"),
    Fault("mlflow-error", TrackingError, lambda e: is_a(e, "mlflow.exceptions.MlflowException"),
          "MLflow tracking or the model registry failed",
          "check that the tracking server answers and the store is writable (tracking.uri / MLFLOW_TRACKING_URI); "
          "nothing was promoted"),
    Fault("hub-unreachable", DataError, lambda e: is_a(e, *_HUB),
          "the model or data set is not on the Hugging Face hub or not in the local cache",
          "use a local folder or file, or go online once to fill the cache (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"),
    Fault("connection-failed", TrackingError, _connection, "a server did not answer (connection refused or timed out)",
          "start the server named here, or fix its address"),
    Fault("corrupt-safetensors", DataError, lambda e: is_a(e, "SafetensorError"),
          "a safetensors file is corrupt or truncated", "re-download or re-save the model", _PARSING),
    Fault("corrupt-gguf", DataError, lambda e: raised_by(e, "gguf/", "transformers/modeling_gguf",
                                                        "transformers/integrations/ggml"),
          "the GGUF file is truncated or corrupt", "re-download it (its size must match the published file)"),
    Fault("corrupt-tokenizer", DataError,
          lambda e: raised_by(e, "tokenizers/", "transformers/tokenization_", "transformers/models/auto/tokenization",
                             "sentencepiece/"),
          "the tokenizer files cannot be read", "re-download or re-save the tokenizer (tokenizer.json, "
          "tokenizer_config.json) next to the model", _READING),
    Fault("bad-json", DataError, lambda e: is_a(e, "json.decoder.JSONDecodeError"),
          "a JSON file is not valid JSON", "fix or replace the file", _PARSING),
    Fault("bad-yaml", DataError, lambda e: is_a(e, "yaml.error.YAMLError"), "a YAML file is not valid YAML",
          "fix or replace the file", _PARSING),
    Fault("not-utf8", DataError, lambda e: isinstance(e, UnicodeDecodeError), "a text file is not UTF-8",
          "convert it to UTF-8 text", _READING),
    Fault("bad-data-file", DataError, lambda e: is_a(e, "ArrowInvalid", "DatasetGenerationError"),
          "a data file cannot be parsed", "fix the file (one JSON object per line with a text field)", _READING),
    Fault("file-missing", DataError, lambda e: isinstance(e, FileNotFoundError), "a file is missing",
          "restore it or fix the path", _READING),
    Fault("no-permission-reading", DataError, _errno(errno.EACCES, errno.EPERM), "a file cannot be read",
          "fix its permissions", _READING),
    Fault("no-permission-writing", OutputError, _errno(errno.EACCES, errno.EPERM), "a file cannot be written",
          "fix the folder's permissions or write elsewhere"),
    Fault("out-of-memory", OutputError, _out_of_memory, "out of memory on the device",
          "lower engine.batch_size or calibration.nsamples, use --stream / engine.stream, or a bigger device"),
    Fault("os-error", OutputError, lambda e: isinstance(e, OSError) and e.errno is not None,
          "the operating system refused an operation", "see the error; check the file, disk and permissions"),
]


def match(exc: BaseException, stage: str | None = None) -> tuple[Fault, BaseException] | None:
    """The first row (and the link of the chain it matched) for ``exc`` raised in ``stage``."""
    links = list(chain(exc))
    for fault in FAULTS:
        if fault.stages is not None and (stage or "") not in fault.stages:
            continue
        for link in links:
            if not isinstance(link, WandaPipelineError) and fault.matches(link):
                return fault, link
    return None


def classify(exc: BaseException, stage: str | None = None, hint: str | None = None) -> WandaPipelineError | None:
    """The error (with its exit code) the table gives ``exc``, or None when no row matches."""
    found = match(exc, stage)
    if found is None:
        return None
    fault, link = found
    place = where(exc, hint)
    inside = f"stage {stage!r}: " if stage else ""
    at = f" ({place})" if place else ""
    detail = f"{type(link).__name__}: {str(link).strip()[:300]}".rstrip(". ")
    err = fault.error(f"{inside}{fault.what}{at}: {detail}. Fix: {fault.fix}")
    err.fault = fault.name
    return err


def unexpected(exc: BaseException, stage: str | None = None) -> WandaPipelineError | None:
    """What no row matched: a failed stage (5) inside a stage; outside one, an exception class
    of a library (not Python's own) raised there is that library's failure (5); else None (a bug)."""
    if stage:
        return RunError(f"stage {stage!r} failed: {type(exc).__name__}: {str(exc)[:500]}")
    module = type(exc).__module__.split(".")[0]
    if module not in ("builtins", "wanda_pipeline") and module not in sys.stdlib_module_names:
        return RunError(f"{module} failed: {type(exc).__name__}: {str(exc)[:500]}; rerun with --debug for the "
                        f"traceback")
    return None
