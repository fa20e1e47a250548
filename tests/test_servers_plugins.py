"""Real servers (prefect server, mlflow server on 127.0.0.1) and installed plugins, via the CLI."""

import json
import os
import subprocess
import sys
import time

import pytest
import requests
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO, bin_path, free_port, needs_data, wait_http

pytestmark = [pytest.mark.slow, needs_data]


def pipelines_file(tmp_path, model_dir, extra: dict | None = None):
    doc = {
        "defaults": {
            "model": {"source": str(model_dir)},
            "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "evaluators": [{"name": "perplexity", "seqlen": 64, "windows": 2}, {"name": "sparsity"}],
            "tracking": {"experiment": "cli-tests"},
        },
        "pipelines": {"tiny": {"pruner": {"name": "wanda", "sparsity": 0.5}, "schedule": {"cron": "0 4 * * *"}},
                      **(extra or {})},
    }
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def cli(args, env, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "wanda_pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


@pytest.fixture()
def base_env(tmp_path):
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_mlflow_server_backend_and_unreachable_server(tmp_path, tiny_dir, base_env):
    port = free_port()
    server = subprocess.Popen(
        [bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=base_env,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", 120, server)
        path = pipelines_file(tmp_path, tiny_dir)
        env = dict(base_env, MLFLOW_TRACKING_URI=uri)
        proc = cli(["run", "tiny", "-f", str(path)], env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "PROMOTED to @champion" in proc.stdout
        client = MlflowClient(uri, uri)
        mv = client.get_model_version_by_alias("tiny", "champion")
        run = client.get_run(mv.run_id)
        assert run.data.tags["pipeline"] == "tiny" and "ppl_wikitext2" in run.data.metrics
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default
    finally:
        server.terminate()
        server.wait(30)
    # The server is gone: the run fails at once with the tracking exit code, before loading anything.
    t0 = time.time()
    proc = cli(["run", "tiny", "-f", str(path)], env, tmp_path)
    assert proc.returncode == 6 and "unreachable" in proc.stderr, proc.stderr[-2000:]
    assert "loaded" not in proc.stderr + proc.stdout
    assert time.time() - t0 < 120


def test_prefect_server_runs_and_serves_schedules(tmp_path, tiny_dir, base_env):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=base_env)
    serving = None
    try:
        wait_http(f"{api}/health", 180, server)
        env = dict(base_env, PREFECT_API_URL=api)
        path = pipelines_file(tmp_path, tiny_dir)
        proc = cli(["run", "tiny", "-f", str(path)], env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs = requests.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert any(r["name"] == "tiny" and r["state_type"] == "COMPLETED" for r in runs)
        serving = subprocess.Popen([sys.executable, "-m", "wanda_pipeline.cli", "serve", "-f", str(path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
        deadline, deployments = time.time() + 120, []
        while time.time() < deadline and not deployments:
            time.sleep(2)
            deployments = requests.post(f"{api}/deployments/filter", json={}, timeout=10).json()
        assert deployments, "serve did not create a deployment"
        dep = deployments[0]
        assert dep["name"] == "tiny"
        crons = [s["schedule"]["cron"] for s in dep.get("schedules", [])]
        assert crons == ["0 4 * * *"]
    finally:
        if serving is not None:
            serving.terminate()
            serving.wait(30)
        server.terminate()
        server.wait(30)


def test_serve_without_server_explains_what_to_do(tmp_path, tiny_dir, base_env):
    proc = cli(["serve", "-f", str(pipelines_file(tmp_path, tiny_dir))], base_env, tmp_path)
    assert proc.returncode == 2 and "prefect server start" in proc.stderr


def test_broken_plugins_are_reported_and_the_rest_still_run(tmp_path, tiny_dir, base_env):
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(REPO / "tests" / "fixtures" / "broken_plugin")],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    env = dict(base_env, PYTHONPATH=os.pathsep.join([str(site), base_env.get("PYTHONPATH", "")]))
    proc = cli(["plugins", "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    assert "ModuleNotFoundError" in rows[("pruner", "broken")]["status"]
    assert rows[("pruner", "broken")]["package"] == "broken-wanda-plugin"
    assert "no pydantic `Config`" in rows[("evaluator", "no-config")]["status"]
    assert rows[("pruner", "wanda")]["status"] == "ok" and rows[("pruner", "crashing")]["status"] == "ok"
    assert rows[("pruner", "ria")]["package"] == "wanda-ria"  # the example plugin, installed by the test command

    path = pipelines_file(tmp_path, tiny_dir, extra={
        "crash": {"pruner": {"name": "crashing"}},
        "broken": {"pruner": {"name": "broken"}},
        "ria": {"pruner": {"name": "ria", "sparsity": 0.5, "a": 0.5}},
    })
    proc = cli(["run", "broken", "-f", str(path)], env, tmp_path)
    assert proc.returncode == 3 and "installed but broken: ModuleNotFoundError" in proc.stderr
    proc = cli(["run", "crash", "-f", str(path)], env, tmp_path)
    assert proc.returncode == 3 and "boom: this pruner always crashes" in proc.stderr
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert [m.name for m in MlflowClient(db, db).search_registered_models()] == []  # nothing half-made
    proc = cli(["run", "tiny", "-f", str(path)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli(["run", "ria", "-f", str(path)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sparsity_total" in proc.stdout and "model ria version 1" in proc.stdout
