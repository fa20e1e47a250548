"""Promotion fails closed against a real ``mlflow server`` that dies between evaluate and register."""

import os
import signal
import subprocess
import time

import pytest
from mlflow import MlflowClient

from tests.conftest import bin_path, free_port, needs_data, quick_spec, wait_http
from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.errors import TrackingError
from wanda_pipeline.run import execute
from wanda_pipeline.tracking import MLflowTracker

pytestmark = [pytest.mark.slow, needs_data]


def start_server(tmp_path, port):
    proc = subprocess.Popen(
        [bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: killing it kills the workers too
    wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
    return proc


def test_server_killed_before_register_promotes_nothing_and_fails_fast(tmp_path, tiny_dir):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    spec = PipelineSpec(**quick_spec(str(tiny_dir), uri, evaluators=[{"name": "sparsity"}],
                                     register={"gates": {"min_sparsity": 0.4}}))
    ran = []

    def kill_before_register(name, fn, *args, cache_key=None):
        ran.append(name)
        if name == "register":
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        return fn(*args)

    try:
        t0 = time.time()
        with pytest.raises(TrackingError) as info:
            execute(spec, pipeline="killed", tracker=MLflowTracker(uri, "tests"), run_stage=kill_before_register)
        assert time.time() - t0 < 120  # MLflow alone would retry for minutes
        assert info.value.exit_code == 6 and uri in str(info.value)
        assert ran[-3:] == ["prune", "evaluate", "register"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    server = start_server(tmp_path, port)  # the same store, back up: nothing was registered or promoted
    try:
        client = MlflowClient(uri, uri)
        assert client.search_registered_models() == []
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
