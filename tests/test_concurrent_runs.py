"""Two ``wanda-pipeline run`` processes started together on one MLflow sqlite file and one
PREFECT_HOME both finish, on a fresh store (MLflow's unlocked schema migration, the embedded
Prefect server's first migration) and on an existing one; and the embedded server's startup
timeout fits a busy machine without the Makefile, unless the user set their own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import needs_data
from wanda_pipeline.settings import PREFECT_STARTUP_TIMEOUT_ENV, service_defaults

READ_SETTING = ("import wanda_pipeline; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
                "as s; print(s.value())")


def user_env(tmp_path, **extra) -> dict:
    """The environment of a user who runs the CLI directly: no Makefile settings, no API URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING"))}
    env.pop(PREFECT_STARTUP_TIMEOUT_ENV, None)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), TQDM_DISABLE="1", **extra)
    return env


def test_service_defaults_keep_the_users_setting():
    env = {}
    service_defaults(env)
    assert env[PREFECT_STARTUP_TIMEOUT_ENV] == "120"
    env = {PREFECT_STARTUP_TIMEOUT_ENV: "7"}
    service_defaults(env)
    assert env[PREFECT_STARTUP_TIMEOUT_ENV] == "7"


@pytest.mark.parametrize("users,expected", [(None, "120.0"), ("45", "45.0")], ids=["unset", "users-own"])
def test_prefect_sees_the_startup_timeout_in_a_fresh_process(tmp_path, users, expected):
    env = user_env(tmp_path, **({PREFECT_STARTUP_TIMEOUT_ENV: users} if users else {}))
    out = subprocess.run([sys.executable, "-c", READ_SETTING], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] in (expected, expected.removesuffix(".0"))


def test_the_embedded_server_is_started_with_the_users_timeout(monkeypatch):
    from wanda_pipeline.orchestration.embedded import startup_timeout

    monkeypatch.delenv(PREFECT_STARTUP_TIMEOUT_ENV, raising=False)
    assert startup_timeout() == 120
    monkeypatch.setenv(PREFECT_STARTUP_TIMEOUT_ENV, "33")
    assert startup_timeout() == 33


def _pipelines(tmp_path, tiny_dir) -> None:
    spec = {"model": {"source": str(tiny_dir)}, "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "pruner": {"name": "wanda", "sparsity": 0.5}, "evaluators": [{"name": "sparsity"}],
            "dense_baseline": False, "register": {"enabled": False},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "side-by-side"}}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": {"a": spec, "b": spec}}))


def _two_at_once(tmp_path) -> list[tuple[int, str]]:
    env = user_env(tmp_path, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "wanda_pipeline.cli", "run", name], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]


def _finished_runs(tmp_path) -> list[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("side-by-side")
    return sorted(r.info.status for r in client.search_runs([exp.experiment_id]))


@pytest.mark.slow
@needs_data
def test_two_runs_started_together_on_one_store_both_finish_fresh_then_existing(tmp_path, tiny_dir):
    _pipelines(tmp_path, tiny_dir)
    for round_, expected in (("fresh store", 2), ("existing store", 4)):
        for code, err in _two_at_once(tmp_path):
            assert code == 0, f"{round_}: {err[-3000:]}"
            assert "Traceback" not in err
        assert _finished_runs(tmp_path) == ["FINISHED"] * expected, round_


OPEN_STORE = ("import sys; from wanda_pipeline.tracking import MLflowTracker; "
              "MLflowTracker(sys.argv[1], 'race').check(True)")


@pytest.mark.slow
def test_two_processes_opening_one_fresh_sqlite_store_both_succeed(tmp_path):
    """The sharp form of the race (no model, no Prefect): without the lock, most rounds fail in
    MLflow's migration ("duplicate column name", "table _alembic_tmp_tags already exists")."""
    for i in range(3):
        uri = f"sqlite:///{tmp_path / f'fresh-{i}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], env=user_env(tmp_path),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in procs:
            err = p.communicate(timeout=300)[1]
            assert p.returncode == 0, err[-2000:]
