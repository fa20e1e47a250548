"""SIGINT / SIGTERM against a real CLI subprocess: exit 130 / 143, the MLflow run ends KILLED
(never RUNNING), nothing is registered, no half-written output, no embedded Prefect server left."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import needs_data

pytestmark = [pytest.mark.slow, needs_data]


def start(args, tmp_path, env_extra=None):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), **(env_extra or {}))
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen([sys.executable, "-m", "wanda_pipeline.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, marker: str, timeout: float = 300) -> str:
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"never saw {marker!r}:\n{''.join(seen)[-3000:]}")


def run_states(db):
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri, uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.status for r in client.search_runs(exps)], client.search_registered_models()


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_prune_interrupted_during_evaluate(tmp_path, tiny_dir, signum, code):
    db = tmp_path / "mlflow.db"
    proc = start(["prune", "--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "64", "--eval-windows", "400",
                  "--eval-seqlen", "128", "--save_model", "out", "--tracking-uri", f"sqlite:///{db}"], tmp_path)
    wait_for(proc, "[stage] evaluate")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    statuses, registered = run_states(db)
    assert statuses == ["KILLED"] and registered == []


def test_run_sigterm_stops_the_embedded_prefect_server(tmp_path, tiny_dir):
    spec = {"model": {"source": str(tiny_dir)}, "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "pruner": {"name": "wanda"}, "dense_baseline": False,
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "evaluators": [{"name": "perplexity", "seqlen": 128, "windows": 400}, {"name": "sparsity"}]}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": {"p": spec}}))
    proc = start(["run", "p"], tmp_path)
    wait_for(proc, "Task run 'prune", timeout=400)  # Prefect logs it when prune ends: evaluate runs now
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "expected the embedded Prefect server as a child process"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.cmdline() for p in alive]
    statuses, registered = run_states(tmp_path / "mlflow.db")
    assert statuses == ["KILLED"] and registered == []
