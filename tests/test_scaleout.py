"""Scale-out on real servers: sweep points as flow runs on a process work pool served by real
``prefect worker`` processes, Ctrl-C leaving nothing behind, and scheduled pipelines as deployments."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
import yaml
from mlflow import MlflowClient

from tests.conftest import bin_path, free_port, needs_data, wait_http
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.scaleout import parse_devices, worker_devices


@pytest.mark.parametrize("workers, devices, expected", [
    (2, "0,1", ["0", "1"]),
    (2, "0,1,2,3", ["0,1", "2,3"]),          # a model spread over two GPUs per worker
    (4, "0,1", ["0", "1", "0", "1"]),        # workers share GPUs round-robin
    (3, None, [None, None, None]),           # no --devices: the variable is left alone
    (1, "GPU-a1,GPU-b2", ["GPU-a1,GPU-b2"]),
])
def test_each_worker_gets_its_devices(workers, devices, expected):
    assert worker_devices(workers, parse_devices(devices)) == expected


@pytest.mark.parametrize("workers, devices, match", [(2, "0,1,2", "multiple"), (0, "0", "at least 1"),
                                                     (2, "0,,1", "distinct"), (2, "0,0", "distinct")])
def test_bad_device_splits_are_refused(workers, devices, match):
    with pytest.raises(ConfigError, match=match):
        worker_devices(workers, parse_devices(devices))


# ------------------------------------------------------------------ real servers and workers
slow = [pytest.mark.slow, needs_data]


def write_pipelines(tmp_path, model_dir, register: bool = False):
    doc = {
        "defaults": {
            "model": {"source": str(model_dir)},
            "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "evaluators": [{"name": "perplexity", "seqlen": 64, "windows": 2}, {"name": "sparsity"}],
            "register": {"enabled": register},
            "tracking": {"experiment": "scaleout"},
        },
        "pipelines": {
            "tiny": {"pruner": {"name": "wanda", "sparsity": 0.5}, "schedule": {"cron": "0 4 * * *"}},
            "missing": {"model": {"source": str(tmp_path / "no-such-model")}, "pruner": {"name": "wanda"}},
        },
        "sweeps": {"grid": {"pipeline": "tiny", "sparsities": [0.3, 0.5, 0.7], "pipelines": ["missing"]},
                   "grid3": {"pipeline": "tiny", "sparsities": [0.3, 0.5, 0.7]}},
    }
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def clean_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), TQDM_DISABLE="1", **extra)
    return env


class Descendants:
    """Every process ever seen below a pid, sampled in a thread while it runs."""

    def __init__(self, pid: int):
        self.root, self.seen, self._stop = pid, {}, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                for p in psutil.Process(self.root).children(recursive=True):
                    # keep the newest command line: a child sampled between fork and exec still shows its parent's
                    self.seen[p.pid] = (p.create_time(), " ".join(p.cmdline()[:6]), p.ppid())
            except psutil.Error:
                pass
            time.sleep(0.3)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def still_alive(self) -> list[str]:
        alive = []
        for pid, (created, cmd, _) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {cmd}")
            except psutil.NoSuchProcess:
                pass
        return alive


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One real ``prefect server`` shared by the tests that bring their own server."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = clean_env(home, PREFECT_UI_ENABLED="false")
    server = subprocess.Popen([bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", 180, server)
        yield api
    finally:
        server.terminate()
        server.wait(30)


def child_runs(uri: str, experiment: str = "scaleout"):
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if "sweep" in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.mark.slow
@needs_data
def test_sweep_points_run_in_parallel_on_a_work_pool(tmp_path, tiny_dir, prefect_api):
    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    env = clean_env(tmp_path, PREFECT_API_URL=prefect_api, MLFLOW_TRACKING_URI=uri)
    path = write_pipelines(tmp_path, tiny_dir)
    proc = subprocess.Popen([sys.executable, "-m", "wanda_pipeline.cli", "sweep", "grid", "-f", str(path),
                             "--workers", "2", "--devices", "0,1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    tree = Descendants(proc.pid)
    out, err = proc.communicate(timeout=600)
    tree.stop()
    # the point without a model fails; the other three still finish, and the command says so
    assert proc.returncode == 5, err[-3000:]
    assert re.search(r"missing .*failed.*does not", out.replace("\n", " ")), out
    assert "1 of 4 point(s) did not finish: missing" in err, out + err[-6000:]
    # two workers started by the sweep itself (a worker's fork can briefly show the same command line)
    workers = [pid for pid, (_, cmd, ppid) in tree.seen.items() if "worker start" in cmd and ppid == proc.pid]
    assert len(workers) == 2, tree.seen
    assert tree.still_alive() == []

    parents, children = child_runs(uri)
    assert len(parents) == 1 and parents[0].data.tags["sweep"] == "grid"
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    done = {c.data.tags["pipeline"]: c for c in children if c.info.status == "FINISHED"}
    assert sorted(done) == ["tiny-s0.3", "tiny-s0.5", "tiny-s0.7"]
    for label, run in done.items():
        target = float(label.split("-s")[1])
        assert abs(run.data.metrics["sparsity_total"] - target) < 1 / 32 and run.data.metrics["ppl_wikitext2"] > 0
    spans = sorted((r.info.start_time, r.info.end_time, r.data.tags["worker.cuda_visible_devices"])
                   for r in done.values())
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]
    assert overlapping, f"no two points ran at the same time: {spans}"
    # two points running at once are on two workers, so on two different devices
    assert all(a[2] != b[2] for a, b in overlapping) and {s[2] for s in spans} <= {"0", "1"}
    # the temporary pool is gone from the user's server
    pools = requests.post(f"{prefect_api}/work_pools/filter", json={}, timeout=10).json()
    assert not [p for p in pools if p["name"].startswith("wanda-sweep-")]


@pytest.mark.slow
@needs_data
def test_ctrl_c_leaves_no_server_worker_or_flow_run_behind(tmp_path, tiny_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = clean_env(tmp_path)
    path = write_pipelines(tmp_path, tiny_dir)
    proc = subprocess.Popen([sys.executable, "-m", "wanda_pipeline.cli", "sweep", "grid3", "-f", str(path),
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    tree = Descendants(proc.pid)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not child_runs(uri)[1]:  # a point is inside its MLflow run
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(1)
        assert child_runs(uri)[1], "no point started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        tree.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    port = int(re.search(r"at http://127\.0\.0\.1:(\d+)/api", err).group(1))
    assert not port_open(port)
    cmds = [cmd for _, cmd, ppid in tree.seen.values() if ppid == proc.pid]
    assert any("server start" in c for c in cmds) and sum("worker start" in c for c in cmds) == 2
    cmds = [cmd for _, cmd, _ in tree.seen.values()]
    assert any("prefect.runner" in c or "prefect.engine" in c for c in cmds)  # flow runs were running
    assert tree.still_alive() == []


@pytest.mark.slow
@needs_data
def test_deployed_schedule_runs_on_a_worker_and_registers_a_model(tmp_path, tiny_dir, prefect_api):
    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    env = clean_env(tmp_path, PREFECT_API_URL=prefect_api, MLFLOW_TRACKING_URI=uri)
    path = write_pipelines(tmp_path, tiny_dir, register=True)
    proc = subprocess.run([sys.executable, "-m", "wanda_pipeline.cli", "deploy", "-f", str(path), "--pool", "nightly"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deps = requests.post(f"{prefect_api}/deployments/filter", json={}, timeout=10).json()
    dep = next(d for d in deps if d["name"] == "tiny")
    assert dep["work_pool_name"] == "nightly" and dep["entrypoint"] == "wanda_pipeline.orchestration.compress.compress"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 4 * * *"]
    assert dep["parameters"]["spec"]["tracking"]["uri"] == uri  # the environment's MLflow, fixed at deploy time

    run = requests.post(f"{prefect_api}/deployments/{dep['id']}/create_flow_run", json={}, timeout=10).json()
    worker = subprocess.Popen([bin_path("prefect"), "worker", "start", "--pool", "nightly", "--type", "process"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(env, PREFECT_WORKER_QUERY_SECONDS="2"), cwd=tmp_path, start_new_session=True)
    try:
        deadline, state = time.time() + 300, None
        while time.time() < deadline:
            state = requests.get(f"{prefect_api}/flow_runs/{run['id']}", timeout=10).json()["state"]
            if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                break
            time.sleep(2)
        assert state["type"] == "COMPLETED", state
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
    client = MlflowClient(uri, uri)
    mv = client.get_model_version_by_alias("tiny", "champion")
    assert str(mv.version) == "1" and client.get_run(mv.run_id).data.tags["prefect_flow_run_id"] == run["id"]
