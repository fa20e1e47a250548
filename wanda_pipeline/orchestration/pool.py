"""Sweep points as flow runs of a deployment on a Prefect work pool.

The deployment's entrypoint is a module path (``wanda_pipeline.orchestration.pool.sweep_point``), so a worker imports
the installed package: no code is copied into storage, and nothing but small JSON travels
through Prefect. Parameters are spec dicts; the point's result is a summary row that lives in
its MLflow run (``point_summary.json``), which also works when workers run on other machines
and Prefect result storage is not shared. Flow results are not persisted.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from prefect import flow
from prefect.runtime import flow_run

from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.errors import RunError
from wanda_pipeline.orchestration.compress import compress
from wanda_pipeline.orchestration.sweep import sweep_row

POINT_SUMMARY = "point_summary.json"


@flow(name="sweep-point", flow_run_name="{pipeline}", persist_result=False)
def sweep_point(pipeline: str, spec: dict, parent_run_id: str | None = None) -> dict:
    """One sweep point, run by a worker: the compress flow, then its summary row in its own MLflow run."""
    from mlflow import MlflowClient

    summary = compress(pipeline, spec, parent_run_id=parent_run_id, tracking=True)
    row = sweep_row(pipeline, PipelineSpec(**spec), summary)
    uri, run_id = summary["tracking_uri"], summary["mlflow_run_id"]
    client = MlflowClient(uri, uri)
    for key, value in {"worker.host": socket.gethostname(),
                       "worker.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                       "prefect_point_flow_run_id": str(flow_run.id)}.items():
        client.set_tag(run_id, key, value)
    client.log_dict(run_id, row, POINT_SUMMARY)
    return row


def deploy_flow(fl, name: str, pool: str, **options) -> str:
    """Register ``fl`` as deployment ``name`` on ``pool``; workers import it by module path."""
    from prefect.types.entrypoint import EntrypointType

    deployment = fl.to_deployment(name=name, entrypoint_type=EntrypointType.MODULE_PATH, **options)
    return str(deployment.apply(work_pool_name=pool))


def submit_points(deployment_id: str, points: list[dict], parent_run_id: str | None, sweep: str,
                  job_variables: dict | None = None, ids: list[str] | None = None) -> list[str]:
    """One flow run per point, appended to ``ids`` as each is created (the workers run them)."""
    from prefect.deployments import run_deployment

    ids = [] if ids is None else ids
    for point in points:
        fr = run_deployment(deployment_id, parameters={"pipeline": point["pipeline"], "spec": point["spec"],
                                                       "parent_run_id": parent_run_id},
                            flow_run_name=point["pipeline"], timeout=0, as_subflow=False,
                            tags=["wanda-pipeline", f"sweep:{sweep}"], job_variables=job_variables or {})
        ids.append(str(fr.id))
    return ids


def _read(ids: list[str]) -> dict[str, object]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in ids])))
    return {str(r.id): r for r in runs}


def wait_for_runs(ids: list[str], workers_alive: Callable[[], bool] = lambda: True, poll: float = 2.0,
                  on_change: Callable[[str, str], None] | None = None) -> dict[str, object]:
    """Poll until every flow run is in a final state; fail if the workers serving them are gone."""
    seen: dict[str, str] = {}
    while True:
        runs = _read(ids)
        for i, r in runs.items():
            state = r.state.name if r.state else "?"
            if on_change and seen.get(i) != state:
                on_change(r.name, state)
            seen[i] = state
        if len(runs) == len(ids) and all(r.state and r.state.is_final() for r in runs.values()):
            return runs
        if not workers_alive():
            raise RunError("every worker of the sweep has exited before the points finished")
        time.sleep(poll)


def cancel_runs(ids: list[str]) -> None:
    """Best effort: cancel what has not finished (a worker stops a running one on Cancelling)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    try:
        runs = _read(ids)
        with get_client(sync_client=True) as client:
            for r in runs.values():
                if r.state and not r.state.is_final():
                    new = Cancelling() if r.state.is_running() else Cancelled(message="sweep interrupted")
                    client.set_flow_run_state(r.id, new, force=True)
    except Exception:
        pass


def point_error(run) -> str:
    """The error of a failed point as its flow run state tells it, on one line."""
    message = (run.state.message or run.state.name) if run.state else "no state"
    return " ".join(message.split())[:300]
