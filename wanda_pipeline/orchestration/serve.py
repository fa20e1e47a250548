"""Scheduled pipelines of a pipelines file as Prefect deployments.

``serve`` keeps one process that runs them (``prefect.serve``); ``deploy`` registers them on a
work pool, so a server schedules them and whichever worker polls the pool runs them.
"""

from __future__ import annotations

import copy
import os

from wanda_pipeline.config import PipelinesFile, PipelineSpec
from wanda_pipeline.errors import ConfigError

_NO_SERVER = ("schedules need a running Prefect server; the embedded one cannot schedule. Start one with "
              "`prefect server start --host 127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api")


def scheduled(doc: PipelinesFile, names: list[str] | None = None) -> list[tuple[str, PipelineSpec]]:
    chosen = names or [n for n, p in doc.pipelines.items() if p.schedule]
    out = []
    for name in chosen:
        if name not in doc.pipelines:
            raise ConfigError(f"no pipeline named {name!r}; available: {', '.join(sorted(doc.pipelines))}")
        spec = doc.pipelines[name]
        if spec.schedule is None:
            raise ConfigError(f"pipelines.{name} has no `schedule:`; add `schedule: {{cron: '0 3 * * 1'}}`")
        out.append((name, spec))
    if not out:
        raise ConfigError("no pipeline has a `schedule:`; nothing to serve")
    return out


def _options(name: str, spec: PipelineSpec, params: dict) -> dict:
    from prefect.schedules import Cron

    return {"schedules": [Cron(spec.schedule.cron, timezone=spec.schedule.timezone)],
            "parameters": {"pipeline": name, "spec": params},
            "description": spec.description or f"wanda-pipeline {name}", "tags": ["wanda-pipeline"]}


def deployments(doc: PipelinesFile, names: list[str] | None = None) -> list:
    from wanda_pipeline.orchestration.compress import compress

    return [compress.to_deployment(name=name, **_options(name, spec, spec.model_dump(by_alias=True)))
            for name, spec in scheduled(doc, names)]


def serve_scheduled(doc: PipelinesFile, names: list[str] | None = None) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(_NO_SERVER)
    from prefect import serve

    serve(*deployments(doc, names))


def deploy_scheduled(doc: PipelinesFile, names: list[str] | None = None,
                     pool: str = "wanda-pipeline") -> dict[str, str]:
    """Register each scheduled pipeline as deployment ``compress/NAME`` on ``pool``; returns name -> id.

    The MLflow URI is fixed now (explicit, else $MLFLOW_TRACKING_URI, else ./mlflow.db made
    absolute), because a worker runs the flow in its own folder, maybe on another machine.
    """
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(_NO_SERVER)
    from wanda_pipeline.orchestration.compress import compress
    from wanda_pipeline.orchestration.pool import deploy_flow
    from wanda_pipeline.scaleout import ensure_process_pool
    from wanda_pipeline.tracking.mlflow_backend import resolve_tracking_uri

    chosen = scheduled(doc, names)
    ensure_process_pool(pool, create=True)
    out = {}
    for name, spec in chosen:
        params = copy.deepcopy(spec.model_dump(by_alias=True))
        params["tracking"]["uri"] = resolve_tracking_uri(spec.tracking.uri)
        out[name] = deploy_flow(compress, name, pool, **_options(name, spec, params))
    return out
