"""What one run writes to the tracker: params at the start, results at the end. The same
for every entry point, because only :func:`wanda_pipeline.run.execute` calls it."""

from __future__ import annotations

from typing import Any

from wanda_pipeline.tracking.plots import sparsity_figure


def log_start(tracker, params: dict[str, Any], spec_dump: dict) -> None:
    tracker.log_params(params)
    tracker.log_dict(spec_dump, "pipeline_config.json")


def log_results(tracker, metrics: dict[str, float], dense: dict[str, float], block_targets: list[float],
                results: dict, weights_digest: str, block_rows: list[dict[str, float]] = ()) -> None:
    """``block_rows``: the engine's per-block rows (step, block_seconds, peak_device_bytes on CUDA)."""
    tracker.log_metrics(metrics)
    for row in block_rows:  # time_/peak_ prefixes: machine-dependent, like the stage times
        per_block = {"time_block_s": row["block_seconds"]}
        if "peak_device_bytes" in row:
            per_block["peak_device_bytes"] = row["peak_device_bytes"]
        tracker.log_metrics(per_block, step=int(row["step"]))
    tracker.log_metrics({f"dense_{k}": v for k, v in dense.items()})
    for i, r in enumerate(block_targets):
        tracker.log_metrics({"block_target_sparsity": r}, step=i)
    tracker.log_dict({k: r.protocol for k, r in results.items()}, "evaluation_protocol.json")
    tracker.set_tags({"weights_digest": weights_digest})
    for key, r in results.items():
        tracker.log_params({f"eval.{key}.{pk}": pv for pk, pv in r.protocol.items()
                            if isinstance(pv, (str, int, float, bool))})
        for table_name, rows in r.tables.items():
            tracker.log_table(rows, f"{table_name}.csv")
    if "sparsity" in results:
        tracker.log_figure(sparsity_figure(results["sparsity"].tables["sparsity_per_layer"], block_targets),
                           "sparsity_per_layer.png")
