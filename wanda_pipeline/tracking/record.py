"""What one run writes to the tracker: params at the start, results at the end. The same
for every entry point, because only :func:`wanda_pipeline.run.execute` calls it."""

from __future__ import annotations

from typing import Any

from wanda_pipeline import per_example
from wanda_pipeline.tracking.plots import sparsity_figure


def log_start(tracker, params: dict[str, Any], spec_dump: dict) -> None:
    tracker.log_params(params)
    tracker.log_dict(spec_dump, "pipeline_config.json")


def log_results(tracker, metrics: dict[str, float], dense: dict[str, float], block_targets: list[float],
                results: dict, weights_digest: str, block_rows: list[dict[str, float]] = (),
                dense_examples: dict | None = None) -> None:
    """``block_rows``: the engine's per-block rows (step, block_seconds, peak_device_bytes on CUDA).
    Per-example results go to :data:`~wanda_pipeline.per_example.ARTIFACT` (and the dense model's to
    ``DENSE_ARTIFACT``), where a later run's beat_champion gate reads them."""
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
    examples = {k: v for r in results.values() for k, v in r.examples.items()}
    if examples:
        tracker.log_dict(per_example.document(examples), per_example.ARTIFACT)
    if dense_examples:
        tracker.log_dict(per_example.document(dense_examples), per_example.DENSE_ARTIFACT)
    tracker.set_tags({"weights_digest": weights_digest})
    for key, r in results.items():
        tracker.log_params({f"eval.{key}.{pk}": pv for pk, pv in r.protocol.items()
                            if isinstance(pv, (str, int, float, bool))})
        for table_name, rows in r.tables.items():
            tracker.log_table(rows, f"{table_name}.csv")
    if "sparsity" in results:
        tracker.log_figure(sparsity_figure(results["sparsity"].tables["sparsity_per_layer"], block_targets),
                           "sparsity_per_layer.png")
