"""Serve the scheduled pipelines of a pipelines file as Prefect deployments."""

from __future__ import annotations

import os

from wanda_pipeline.config import PipelinesFile
from wanda_pipeline.errors import ConfigError


def deployments(doc: PipelinesFile, names: list[str] | None = None) -> list:
    from prefect.schedules import Cron

    from wanda_pipeline.orchestration.compress import compress

    chosen = names or [n for n, p in doc.pipelines.items() if p.schedule]
    out = []
    for name in chosen:
        if name not in doc.pipelines:
            raise ConfigError(f"no pipeline named {name!r}; available: {', '.join(sorted(doc.pipelines))}")
        spec = doc.pipelines[name]
        if spec.schedule is None:
            raise ConfigError(f"pipelines.{name} has no `schedule:`; add `schedule: {{cron: '0 3 * * 1'}}`")
        out.append(compress.to_deployment(
            name=name, schedules=[Cron(spec.schedule.cron, timezone=spec.schedule.timezone)],
            parameters={"pipeline": name, "spec": spec.model_dump(by_alias=True)},
            description=spec.description or f"wanda-pipeline {name}", tags=["wanda-pipeline"],
        ))
    if not out:
        raise ConfigError("no pipeline has a `schedule:`; nothing to serve")
    return out


def serve_scheduled(doc: PipelinesFile, names: list[str] | None = None) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "schedules need a running Prefect server; the embedded one cannot schedule. Start one with "
            "`prefect server start --host 127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from prefect import serve

    serve(*deployments(doc, names))
