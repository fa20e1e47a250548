"""The ``sweep`` flow: several ``compress`` subflows under one parent MLflow run."""

from __future__ import annotations

import json

from prefect import flow
from prefect.runtime import flow_run

from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.orchestration.compress import _tracker, compress
from wanda_pipeline.tracking.plots import sweep_figure


class _no_run:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def sweep_row(pipeline: str, spec: PipelineSpec, summary: dict | None) -> dict:
    """One line of a sweep's results table; ``summary`` is None for a point that failed."""
    if summary is None:
        return {"pipeline": pipeline, "pruner": spec.pruner.name}
    pruner = summary["params"]["pruner"]
    row = {"pipeline": pipeline, "pruner": pruner["name"], "pattern": pruner["pattern"],
           "target": summary["params"]["target_sparsity"]}
    row.update({k: v for k, v in summary["metrics"].items() if not k.startswith(("time_", "peak_", "counter_"))})
    if summary.get("registration"):
        row["promoted"] = summary["registration"]["promoted"]
    return row


@flow(name="sweep", flow_run_name="sweep-{name}")
def sweep(name: str, points: list[dict], tracking: bool = True) -> list[dict]:
    """Run each point ``{"pipeline": name, "spec": {...}}`` as a compress subflow; one parent MLflow run."""
    tracker = _tracker(PipelineSpec(**points[0]["spec"]), tracking)
    table: list[dict] = []
    dense_cache: dict[str, dict] = {}  # the dense model's metrics and per-example results, per model + evaluators
    ctx = tracker.run(f"sweep-{name}", tags={"sweep": name, "prefect_flow_run_id": str(flow_run.id)}) \
        if tracker else _no_run()
    with ctx as parent:
        for point in points:
            spec = PipelineSpec(**point["spec"])
            dense_key = json.dumps([spec.model.model_dump(), [e.model_dump() for e in spec.evaluators]], sort_keys=True)
            cached = dense_cache.get(dense_key, {})
            s = compress(point["pipeline"], point["spec"], dense_metrics=cached.get("dense"),
                         parent_run_id=parent, tracking=tracking, dense_examples=cached.get("examples"))
            dense_cache.setdefault(dense_key, {"dense": s["dense"], "examples": s.get("dense_examples")})
            table.append(sweep_row(point["pipeline"], spec, s))
        if tracker:
            tracker.log_table(table, "sweep_results.csv")
            ppl = next((k for k in table[0] if k.startswith("ppl_") and not k.endswith("_vs_dense")), None)
            if ppl:
                tracker.log_figure(sweep_figure(table, ppl), "perplexity_vs_sparsity.png")
    return table
