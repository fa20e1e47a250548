"""``wanda-pipeline sweep NAME --workers N`` / ``--pool POOL``: a sweep whose points run in parallel
as flow runs on a Prefect work pool, each its own MLflow run nested under one parent run.

Where things run:
- no PREFECT_API_URL: a local ``prefect server`` lives for the sweep, with N local workers;
- PREFECT_API_URL, no ``--pool``: the user's server, a temporary pool and N local workers;
- PREFECT_API_URL and ``--pool P``: the user's server and pool, served by their workers
  (plus N local ones if ``--workers N`` is given).
Everything started here is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path

from wanda_pipeline import stages
from wanda_pipeline.config import PipelinesFile, PipelineSpec
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.orchestration.pool import (
    POINT_SUMMARY,
    cancel_runs,
    deploy_flow,
    point_error,
    submit_points,
    sweep_point,
    wait_for_runs,
)
from wanda_pipeline.orchestration.sweep import sweep_row
from wanda_pipeline.pipelines_file import sweep_points
from wanda_pipeline.plugins import discover
from wanda_pipeline.scaleout import LocalPrefectServer, WorkerGroup, ensure_process_pool, worker_devices
from wanda_pipeline.tracking import MLflowTracker
from wanda_pipeline.tracking.mlflow_backend import resolve_tracking_uri
from wanda_pipeline.tracking.plots import sweep_figure


def _progress(name: str, state: str) -> None:
    if state not in {"Scheduled", "Late", "Pending", "Submitting"}:  # only what a user acts on
        print(f"point {name}: {state}", file=sys.stderr, flush=True)


def pooled_points(doc: PipelinesFile, name: str) -> tuple[list[dict], str]:
    """The sweep's points with plugins checked and one tracking URI resolved here, so workers in
    other folders (or on other machines) log to the same place."""
    points = sweep_points(doc, name)
    registry = discover()
    uris = set()
    for point in points:
        spec = PipelineSpec(**point["spec"])
        stages.build_plugins(spec, registry)
        uri = resolve_tracking_uri(spec.tracking.uri)
        point["spec"] = copy.deepcopy(point["spec"])
        point["spec"]["tracking"]["uri"] = uri
        uris.add(uri)
    if len(uris) != 1:
        raise ConfigError(f"sweeps.{name}: the points track to {len(uris)} MLflow URIs ({', '.join(sorted(uris))}); "
                          f"a sweep nests its points under one parent run, so give them one `tracking.uri`")
    if any(u.startswith("sqlite:///") and not u.startswith("sqlite:////") for u in uris):
        raise ConfigError(f"tracking URI {uris.pop()} is relative; workers run elsewhere, use an absolute path")
    return points, uris.pop()


def run_sweep_on_pool(doc: PipelinesFile, name: str, workers: int, pool: str | None = None,
                      devices: list[str] | None = None) -> list[dict]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    points, uri = pooled_points(doc, name)
    user_api = os.environ.get("PREFECT_API_URL")
    if pool and not user_api:
        raise ConfigError("--pool names a work pool on your Prefect server: set PREFECT_API_URL to that server "
                          "(e.g. http://HOST:4200/api), or leave out --pool to let the sweep start its own")
    if devices and not workers:
        raise ConfigError("--devices splits GPUs between the workers this sweep starts; add --workers N")
    slots = worker_devices(workers, devices or []) if workers else []
    first = PipelineSpec(**points[0]["spec"])
    tracker = MLflowTracker(uri, first.tracking.experiment)
    tracker.check()
    with ExitStack() as stack:
        api = user_api or stack.enter_context(LocalPrefectServer()).api_url
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api}))
        own_pool = pool is None
        pool = pool or f"wanda-sweep-{uuid.uuid4().hex[:8]}"
        ensure_process_pool(pool, create=own_pool)
        deployment_id = deploy_flow(sweep_point, name, pool, tags=["wanda-pipeline", "sweep"],
                                    description=f"points of wanda-pipeline sweep {name}")
        if own_pool and user_api:
            stack.callback(_remove_pool, pool, deployment_id)
        group = stack.enter_context(WorkerGroup(api, pool, [{"CUDA_VISIBLE_DEVICES": d} if d else {} for d in slots]))
        theirs = "" if own_pool else " + the pool's own"
        print(f"sweep {name}: {len(points)} point(s) on work pool {pool!r} at {api}, "
              f"{len(slots)} local worker(s){theirs}", file=sys.stderr)
        with tracker.run(f"sweep-{name}", tags={"sweep": name, "prefect_work_pool": pool,
                                                "sweep.local_workers": str(len(slots))}) as parent:
            # Local workers share this folder, so relative model and data paths mean the same there.
            job_vars = {"working_dir": os.getcwd()} if own_pool else None
            ids: list[str] = []
            alive = (lambda: group.alive() > 0) if own_pool else (lambda: True)
            try:
                submit_points(deployment_id, points, parent, name, job_vars, ids)
                runs = wait_for_runs(ids, alive, on_change=_progress)
            except BaseException:  # Ctrl-C included: no point of this sweep is left queued on the server
                cancel_runs(ids)
                raise
            table = _table(tracker, parent, points, [runs[i] for i in ids])
            tracker.log_table(table, "sweep_results.csv")
            ok = [r for r in table if r["status"] == "ok"]
            ppl = next((k for k in (ok[0] if ok else {}) if k.startswith("ppl_") and not k.endswith("_vs_dense")), None)
            if ppl:
                tracker.log_figure(sweep_figure(ok, ppl), "perplexity_vs_sparsity.png")
    return table


def _table(tracker: MLflowTracker, parent: str, points: list[dict], runs: list) -> list[dict]:
    """Rows from each point's MLflow run (its summary), or its flow run's error."""
    client = tracker.client
    experiments = {PipelineSpec(**p["spec"]).tracking.experiment for p in points}
    ids = [e.experiment_id for e in (client.get_experiment_by_name(x) for x in experiments) if e]
    children = client.search_runs(ids, filter_string=f"tags.mlflow.parentRunId = '{parent}'") if ids else []
    by_label = {r.data.tags.get("pipeline"): r for r in children}
    table = []
    for point, fr in zip(points, runs, strict=True):
        spec = PipelineSpec(**point["spec"])
        child = by_label.get(point["pipeline"])
        if fr.state and fr.state.is_completed() and child is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(child.info.run_id, POINT_SUMMARY, tmp)
                row = json.loads(Path(path).read_text())
            table.append({**row, "status": "ok"})
        else:
            table.append({**sweep_row(point["pipeline"], spec, None), "status": fr.state.name.lower(),
                          "error": point_error(fr)})
    return table


def _remove_pool(pool: str, deployment_id: str) -> None:
    """A temporary pool on the user's server goes when the sweep does."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)
            client.delete_work_pool(pool)
    except Exception:
        pass
