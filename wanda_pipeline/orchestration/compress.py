"""The ``compress`` flow: :func:`wanda_pipeline.run.execute` with every stage run as a Prefect task.

Tasks that take a model never cache (``NO_CACHE``: Prefect would pickle the model to hash it).
Only a stage given a content ``cache_key`` (calibration: settings + weights fingerprint +
tokenizer files + data file digest) is cached, so a changed input is never served stale; its
cache record is written and read under a process lock (:mod:`.cache_lock`), so concurrent
points never read a half-written one.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.runtime import flow_run

from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.orchestration.cache_lock import ProcessLockManager
from wanda_pipeline.run import execute


def prefect_stage(name: str, fn, *args: Any, cache_key: str | None = None) -> Any:
    """A ``run_stage`` hook for :func:`execute`: run the stage as a task named after it (on a CPU,
    saying first about how long a long one will take)."""
    from wanda_pipeline.estimate import before_stage

    before_stage(name, args)
    if cache_key:
        wrapped = task(fn, name=name, cache_policy=cached_policy(cache_key), cache_expiration=timedelta(days=30),
                       persist_result=True)
    else:
        wrapped = task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)
    return wrapped(*args)


def cached_policy(cache_key: str) -> CacheKeyFnPolicy:
    """Cache under ``cache_key``, serialised across processes sharing the result storage: one
    computes and writes, the others wait and read the finished record (never a half-written one)."""
    from prefect.settings import get_current_settings

    locks = Path(get_current_settings().results.local_storage_path) / ".wanda-locks"
    return CacheKeyFnPolicy(cache_key_fn=lambda *_: cache_key).configure(
        isolation_level="SERIALIZABLE", lock_manager=ProcessLockManager(locks))


def _tracker(spec: PipelineSpec, tracking: bool):
    if not tracking:
        return None
    from wanda_pipeline.tracking import MLflowTracker

    return MLflowTracker(spec.tracking.uri, spec.tracking.experiment)


@flow(name="compress", flow_run_name="{pipeline}")
def compress(pipeline: str, spec: dict, dense_metrics: dict | None = None, parent_run_id: str | None = None,
             tracking: bool = True, dense_examples: dict | None = None) -> dict:
    """One pipeline point; callable with a plain spec dict (deployments, sweeps, work pools)."""
    spec_obj = PipelineSpec(**spec)
    tags = {"prefect_flow_run_id": str(flow_run.id), "prefect_flow_run_name": flow_run.name}
    result = execute(spec_obj, pipeline=pipeline, tracker=_tracker(spec_obj, tracking), run_stage=prefect_stage,
                     dense_metrics=dense_metrics, dense_examples=dense_examples, parent_run_id=parent_run_id,
                     run_tags=tags)
    summary = result.as_dict()
    summary["prefect_flow_run_id"] = str(flow_run.id)
    _link_artifact(summary)
    return summary


def _link_artifact(summary: dict) -> None:
    """A Prefect artifact on the flow run that points at the MLflow run (the other direction of the link)."""
    if not summary.get("mlflow_run_id"):
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key="mlflow-run", description="the MLflow run of this pipeline run",
                                 markdown=f"MLflow run `{summary['mlflow_run_id']}` at `{summary['tracking_uri']}`")
    except Exception:  # an artifact is a convenience; never fail a finished run over it
        pass
