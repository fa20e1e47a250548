"""Prefect flows: thin orchestration over ``wanda_pipeline.stages``.

``compress`` runs validate -> load -> calibrate -> evaluate-dense -> prune -> (quantize)
-> evaluate -> register, one task per stage, inside one MLflow run. ``sweep`` runs several
``compress`` subflows under one parent MLflow run and returns a results table.

Models pass between tasks in memory: every task that touches one has ``NO_CACHE`` so
Prefect never pickles it. Only the calibration windows are cached, by a content key.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.runtime import flow_run

from wanda_pipeline import __version__, stages
from wanda_pipeline.config import PipelinesFile, PipelineSpec, apply_overrides
from wanda_pipeline.data import Windows, local_document_file, read_local_documents
from wanda_pipeline.errors import ConfigError, DataError
from wanda_pipeline.models import resolve_source, state_digest
from wanda_pipeline.plugins import discover
from wanda_pipeline.sparsity import pattern_sparsity
from wanda_pipeline.tracking import MLflowTracker, Registration, evaluate_gates
from wanda_pipeline.tracking.plots import sparsity_figure, sweep_figure


def _windows_key(_context, parameters: dict) -> str:
    spec = parameters["spec"]
    loaded = parameters["loaded"]
    tok = loaded.tokenizer
    blob = json.dumps([spec.model_dump(), loaded.info.fingerprint, type(tok).__name__, len(tok)], sort_keys=True)
    return "calib-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(spec: PipelineSpec, tracker: MLflowTracker | None) -> stages.Plugins:
    """Everything cheap that can fail: plugins and options, model source, data, tracking."""
    plugins = stages.build_plugins(spec, discover())
    resolve_source(spec.model.source)
    cal = spec.calibration
    local = local_document_file(cal.source, "train", cal.path) if cal.source != "self" else None
    # Only local data is read here; a hub source is fetched once, by the calibrate task.
    if plugins.pruner.required_stats() and local is not None:
        if not any(d.strip() for d in read_local_documents(local)):
            raise DataError(f"calibration source {cal.path or cal.source!r} has no text")
    for kind, plugin in [("evaluator", e) for e in plugins.evaluators.values()] + [("quantizer", plugins.quantizer)]:
        path = getattr(getattr(plugin, "config", None), "path", None)
        if path and not Path(path).expanduser().exists():
            raise DataError(f"{kind} {type(plugin).__name__} reads {path!r}, which does not exist; fix its `path`")
    if tracker is not None:
        tracker.check()
    return plugins


@task(name="load", cache_policy=NO_CACHE)
def load_task(spec: PipelineSpec) -> stages.Loaded:
    loaded = stages.load(spec.model)
    get_run_logger().info("loaded %s (%s, %d blocks at %s)", spec.model.source, loaded.info.family,
                          loaded.info.n_blocks, loaded.info.blocks_path)
    return loaded


@task(name="calibrate", cache_policy=CacheKeyFnPolicy(cache_key_fn=_windows_key),
      cache_expiration=timedelta(days=30), persist_result=True)
def calibrate_task(spec, loaded: stages.Loaded) -> Windows:
    windows = stages.calibrate(spec, loaded)
    get_run_logger().info("calibration: %d x %d tokens from %s, digest %s", windows.nsamples, windows.seqlen,
                          windows.source, windows.digest)
    return windows


@task(name="evaluate-dense", cache_policy=NO_CACHE)
def evaluate_dense_task(loaded: stages.Loaded, evaluators: dict) -> dict:
    results = stages.evaluate(loaded.model, loaded.tokenizer,
                              {k: v for k, v in evaluators.items() if k != "sparsity"})
    return results


@task(name="prune", cache_policy=NO_CACHE)
def prune_task(loaded: stages.Loaded, windows: Windows | None, pruner, spec: PipelineSpec):
    outcome = stages.prune(loaded, windows, pruner, spec)
    get_run_logger().info("pruned %d blocks in %.1fs", outcome.engine.blocks, sum(outcome.engine.seconds_per_block))
    return outcome


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(loaded: stages.Loaded, quantizer, spec: PipelineSpec) -> stages.QuantizeReport:
    report = stages.quantize(loaded.model, quantizer, spec.engine)
    get_run_logger().info("quantized %d linears, %.2f bits/weight, all %d pruned zeros kept",
                          report.quantized_linears, report.bits_per_weight, report.zeros_before)
    return report


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(loaded: stages.Loaded, evaluators: dict) -> dict:
    return stages.evaluate(loaded.model, loaded.tokenizer, evaluators)


@task(name="register", cache_policy=NO_CACHE)
def register_task(loaded: stages.Loaded, spec: PipelineSpec, pipeline: str, tracker: MLflowTracker,
                  metrics: dict, dense: dict, provenance: dict) -> dict:
    """Log the model; register a version; promote it only if every gate passes."""
    from wanda_pipeline.saving import folder_bytes, save_model, save_sparse

    log = get_run_logger()
    reg = spec.registration
    with tempfile.TemporaryDirectory(prefix="wanda-model-") as tmp:
        saver = save_sparse if reg.compressed else save_model
        saver(loaded.model, loaded.tokenizer, tmp, provenance)
        stored = folder_bytes(tmp)
        dense_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        tracker.log_metrics({"model_stored_bytes": stored, "model_dense_bytes": dense_bytes,
                             "model_stored_ratio": stored / dense_bytes})
        model_uri = tracker.log_model(tmp, metadata={"sparsity": metrics.get("sparsity_total"),
                                                     "pipeline": pipeline, "format": saver.__name__})
    out: dict[str, Any] = {"model_uri": model_uri, "stored_bytes": stored}
    if not reg.enabled:
        return out
    name = reg.model_name or pipeline
    champion = tracker.champion_metrics(name, reg.alias)
    gates = evaluate_gates(reg.gates, metrics, dense, provenance["target_sparsity"], champion)
    passed = all(g.passed for g in gates)
    tags = {"pipeline": pipeline, "pruner": spec.pruner.name, "sparsity": f"{metrics.get('sparsity_total', 0):.4f}",
            "pattern": spec.pruner.options().get("pattern", "unstructured"),
            "gates_passed": str(passed).lower()}
    tags.update({f"metric.{k}": f"{v:.6g}" for k, v in metrics.items() if not k.startswith("sparsity_block")})
    failed = [g for g in gates if not g.passed]
    if failed:
        tags["promotion_blocked_reason"] = "; ".join(f"{g.name}: {g.detail}" for g in failed)
    version = tracker.register(model_uri, name, tags)
    if passed:
        tracker.promote(name, version, reg.alias, reason="passed all gates", manual=False)
        log.info("registered %s v%s and promoted it to @%s", name, version, reg.alias)
    else:
        log.warning("registered %s v%s but did NOT promote it: %s", name, version, tags["promotion_blocked_reason"])
    out["registration"] = Registration(name=name, version=version, alias=reg.alias, promoted=passed,
                                       gates=[g.as_dict() for g in gates],
                                       reason=tags.get("promotion_blocked_reason", "")).__dict__
    return out


def _metrics_of(results: dict) -> dict[str, float]:
    return {k: v for r in results.values() for k, v in r.metrics.items()}


def _versions() -> dict[str, str]:
    import mlflow
    import prefect
    import torch
    import transformers

    return {"wanda_pipeline": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "prefect": prefect.__version__, "mlflow": mlflow.__version__}


@flow(name="compress", flow_run_name="{pipeline}")
def compress(pipeline: str, spec: dict, dense_metrics: dict | None = None, parent_run_id: str | None = None,
             tracking: bool = True) -> dict:
    """One pipeline: validate, load, calibrate, (dense eval), prune, (quantize), evaluate, register."""
    log = get_run_logger()
    spec_obj = PipelineSpec(**spec)
    tracker = MLflowTracker(spec_obj.tracking.uri, spec_obj.tracking.experiment) if tracking else None
    clock = stages.StageClock()
    plugins = clock.timed("validate", validate_task, spec_obj, tracker)
    summary: dict[str, Any] = {"pipeline": pipeline, "prefect_flow_run_id": str(flow_run.id)}
    tags = {"pipeline": pipeline, "prefect_flow_run_id": str(flow_run.id), "prefect_flow_run_name": flow_run.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_ctx = tracker.run(pipeline, tags=tags, nested=bool(parent_run_id)) if tracker else _null_run()

    with run_ctx as run_id:
        summary["mlflow_run_id"] = run_id
        summary["tracking_uri"] = tracker.uri if tracker else None
        # Retries help only where loading crosses a network (a hub id); a bad local path fails at once.
        from_hub = not Path(resolve_source(spec_obj.model.source)[0]).exists()
        loader = load_task.with_options(retries=2, retry_delay_seconds=15) if from_hub else load_task
        loaded = clock.timed("load", loader, spec_obj)
        windows = None
        if plugins.pruner.required_stats():
            windows = clock.timed("calibrate", calibrate_task, spec_obj.calibration, loaded)
        target = pattern_sparsity(spec_obj.pruner.options().get("pattern", "unstructured"),
                                  plugins.pruner.config.sparsity)
        params = {
            "pipeline": pipeline,
            "model": {**spec_obj.model.model_dump(), "fingerprint": loaded.info.fingerprint,
                      "family": loaded.info.family, "n_blocks": loaded.info.n_blocks},
            "pruner": {"name": spec_obj.pruner.name, **plugins.pruner.config.model_dump()},
            "target_sparsity": target,
            "allocation": spec_obj.allocation.model_dump(),
            "calibration": {**spec_obj.calibration.model_dump(),
                            "seqlen_used": windows.seqlen if windows else None,
                            "windows_digest": windows.digest if windows else None},
            "quantizer": ({"name": spec_obj.quantizer.name, **plugins.quantizer.config.model_dump()}
                          if plugins.quantizer else "none"),
            "engine": spec_obj.engine.model_dump(),
            "versions": _versions(),
        }
        if tracker:
            tracker.log_params(params)
            tracker.log_dict(spec_obj.model_dump(by_alias=True), "pipeline_config.json")

        dense = dict(dense_metrics or {})
        if spec_obj.dense_baseline and not dense and any(k != "sparsity" for k in plugins.evaluators):
            dense = _metrics_of(clock.timed("evaluate-dense", evaluate_dense_task, loaded, plugins.evaluators))
        outcome = clock.timed("prune", prune_task, loaded, windows, plugins.pruner, spec_obj)
        metrics: dict[str, float] = {f"counter_{k}": v for k, v in outcome.counters.items()}
        if plugins.quantizer is not None:
            q = clock.timed("quantize", quantize_task, loaded, plugins.quantizer, spec_obj)
            metrics.update({"quant_bits_per_weight": q.bits_per_weight, "quant_model_bytes": q.model_bytes,
                            "quant_dense_model_bytes": q.dense_model_bytes, "quant_zeros_kept": q.zeros_after})
        else:
            log.info("no quantizer configured: quantize stage skipped")
        results = clock.timed("evaluate", evaluate_task, loaded, plugins.evaluators)
        summary["weights_digest"] = state_digest(loaded.model)  # what a reload must reproduce
        metrics.update(_metrics_of(results))
        for k, v in dense.items():
            if k in metrics and v:
                metrics[f"{k}_vs_dense"] = metrics[k] / v
        summary["metrics"] = {k: v for k, v in metrics.items() if not k.startswith("sparsity_block_")}
        summary["dense"] = dense
        summary["block_ratios"] = outcome.block_ratios
        summary["protocols"] = {k: r.protocol for k, r in results.items()}
        if tracker:
            tracker.log_metrics(metrics)
            tracker.log_metrics({f"dense_{k}": v for k, v in dense.items()})
            for i, r in enumerate(outcome.block_ratios):
                tracker.log_metrics({"block_target_sparsity": r}, step=i)
            tracker.log_dict(summary["protocols"], "evaluation_protocol.json")
            tracker.set_tags({"weights_digest": summary["weights_digest"]})
            for key, r in results.items():
                for pk, pv in r.protocol.items():
                    if isinstance(pv, (str, int, float, bool)):
                        tracker.log_params({f"eval.{key}.{pk}": pv})
                for table_name, rows in r.tables.items():
                    tracker.log_table(rows, f"{table_name}.csv")
            if "sparsity" in results:
                tracker.log_figure(sparsity_figure(results["sparsity"].tables["sparsity_per_layer"],
                                                   outcome.block_ratios), "sparsity_per_layer.png")
            provenance = {**params, "metrics": summary["metrics"], "dense": dense}
            reg = clock.timed("register", register_task, loaded, spec_obj, pipeline, tracker, metrics, dense,
                              provenance)
            summary["model_uri"] = reg["model_uri"]
            summary["registration"] = reg.get("registration")
        if spec_obj.save:
            from wanda_pipeline.saving import save_model

            save_model(loaded.model, loaded.tokenizer, spec_obj.save, {**params, "metrics": summary["metrics"]})
        summary["stages"] = list(clock.seconds)  # in the order they ran
        clock_metrics = {f"time_{k.replace('-', '_')}_s": v for k, v in clock.seconds.items()}
        clock_metrics["peak_rss_bytes"] = stages.peak_rss_bytes()
        summary["metrics"].update(clock_metrics)
        if tracker:
            tracker.log_metrics(clock_metrics)
    _link_artifact(summary)
    return summary


class _null_run:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _link_artifact(summary: dict) -> None:
    """A Prefect artifact on the flow run that points at the MLflow run (the other direction of the link)."""
    if not summary.get("mlflow_run_id"):
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            key="mlflow-run",
            markdown=f"MLflow run `{summary['mlflow_run_id']}` at `{summary['tracking_uri']}`",
            description="the MLflow run of this pipeline run",
        )
    except Exception:  # an artifact is a convenience; never fail a finished run over it
        pass


def sweep_row(pipeline: str, spec: PipelineSpec, summary: dict | None) -> dict:
    """One line of a sweep's results table; ``summary`` is None for a point that failed."""
    row = {"pipeline": pipeline, "pruner": spec.pruner.name,
           "pattern": spec.pruner.options().get("pattern", "unstructured"),
           "target": spec.pruner.options().get("sparsity", 0.5)}
    if summary is None:
        return row
    row.update({k: v for k, v in summary["metrics"].items() if not k.startswith(("time_", "peak_", "counter_"))})
    if summary.get("registration"):
        row["promoted"] = summary["registration"]["promoted"]
    return row


@flow(name="sweep", flow_run_name="sweep-{name}")
def sweep(name: str, points: list[dict], tracking: bool = True) -> list[dict]:
    """Run each point ``{"pipeline": name, "spec": {...}}`` as a compress subflow; one parent MLflow run."""
    first = PipelineSpec(**points[0]["spec"])
    tracker = MLflowTracker(first.tracking.uri, first.tracking.experiment) if tracking else None
    if tracker:
        tracker.check()
    table: list[dict] = []
    dense_cache: dict[str, dict] = {}
    ctx = tracker.run(f"sweep-{name}", tags={"sweep": name, "prefect_flow_run_id": str(flow_run.id)}) \
        if tracker else _null_run()
    with ctx as parent:
        for point in points:
            spec = PipelineSpec(**point["spec"])
            dense_key = json.dumps([spec.model.model_dump(), [e.model_dump() for e in spec.evaluators]], sort_keys=True)
            s = compress(point["pipeline"], point["spec"], dense_metrics=dense_cache.get(dense_key),
                         parent_run_id=parent, tracking=tracking)
            dense_cache.setdefault(dense_key, s["dense"])
            table.append(sweep_row(point["pipeline"], spec, s))
        if tracker:
            tracker.log_table(table, "sweep_results.csv")
            ppl = next((k for k in table[0] if k.startswith("ppl_") and not k.endswith("_vs_dense")), None)
            if ppl:
                tracker.log_figure(sweep_figure(table, ppl), "perplexity_vs_sparsity.png")
    return table


def pipeline_spec(doc: PipelinesFile, name: str, overrides: list[str] | None = None) -> PipelineSpec:
    if name not in doc.pipelines:
        raise ConfigError(f"no pipeline named {name!r}; available: {', '.join(sorted(doc.pipelines))}")
    spec = doc.pipelines[name]
    return apply_overrides(spec, overrides, f"pipelines.{name}") if overrides else spec


def run_pipeline_by_name(doc: PipelinesFile, name: str, overrides: list[str] | None = None) -> dict:
    spec = pipeline_spec(doc, name, overrides)
    stages.build_plugins(spec, discover())  # overrides can introduce bad options: fail before Prefect starts
    return compress(name, spec.model_dump(by_alias=True))


def sweep_points(doc: PipelinesFile, name: str) -> list[dict]:
    if name not in doc.sweeps:
        raise ConfigError(f"no sweep named {name!r}; available: {', '.join(sorted(doc.sweeps)) or 'none'}")
    sw = doc.sweeps[name]
    points = []
    for p in [sw.pipeline, *sw.pipelines]:
        base = doc.pipelines[p]
        grid = sw.sparsities if (p == sw.pipeline and sw.sparsities) else [None]
        for s in grid:
            spec = apply_overrides(base, [f"pruner.sparsity={s}"]) if s is not None else base
            label = f"{p}-s{s:g}" if s is not None else p
            points.append({"pipeline": label, "spec": spec.model_dump(by_alias=True)})
    return points


def run_sweep_by_name(doc: PipelinesFile, name: str) -> list[dict]:
    points = sweep_points(doc, name)
    registry = discover()
    for point in points:
        stages.build_plugins(PipelineSpec(**point["spec"]), registry)
    return sweep(name, points)
