"""The ONE stage sequence. Every entry point (``prune``, ``run``, ``sweep``, the benches, the
Prefect flow) calls :func:`execute`; no other file knows the order of the stages:

    preflight -> load -> calibrate -> evaluate-dense -> prune -> quantize -> evaluate
              -> save -> register

``run_stage(name, fn, *args, cache_key=None)`` runs one stage; the default calls it, the
Prefect flow wraps it in a task. Only stages given a ``cache_key`` (a content digest) may
be cached; a stage that takes a model never is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wanda_pipeline import __version__, stages
from wanda_pipeline.config import PipelineSpec, SaveSpec
from wanda_pipeline.errors import WandaPipelineError, stage_failure
from wanda_pipeline.intervals import is_companion
from wanda_pipeline.preflight import Checked, Output, preflight
from wanda_pipeline.quantizers.calibrated import calibrated_stats

StageRunner = Callable[..., Any]


def call(name: str, fn: Callable, *args: Any, cache_key: str | None = None) -> Any:
    """The plain stage runner: just call the stage."""
    return fn(*args)


@dataclass
class RunResult:
    pipeline: str
    metrics: dict[str, float] = field(default_factory=dict)
    dense: dict[str, float] = field(default_factory=dict)
    dense_examples: dict[str, dict] = field(default_factory=dict)  # per-example results, reused by sweeps
    params: dict[str, Any] = field(default_factory=dict)
    block_targets: list[float] = field(default_factory=list)  # target sparsity of each block
    protocols: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, in the order they ran
    weights_digest: str = ""
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    registration: dict | None = None
    saved: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["stages"] = list(self.seconds)
        return out


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"wanda_pipeline": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _metrics_of(results: dict) -> dict[str, float]:
    return {k: v for r in results.values() for k, v in r.metrics.items()}


def _examples_of(results: dict) -> dict[str, dict]:
    return {k: v for r in results.values() for k, v in r.examples.items()}


def execute(spec: PipelineSpec, *, pipeline: str = "pipeline", tracker=None, run_stage: StageRunner = call,
            checked: Checked | None = None, outputs: list[Output] | None = None, save: SaveSpec | None = None,
            dense_metrics: dict | None = None, dense_examples: dict | None = None, parent_run_id: str | None = None,
            run_tags: dict[str, str] | None = None, progress: bool = True) -> RunResult:
    """Run one pipeline and return its :class:`RunResult`. Preflight first (unless ``checked``
    is given), so bad input fails before anything is loaded or tracked."""
    result = RunResult(pipeline=pipeline, tracking_uri=tracker.uri if tracker else None)
    save = save or spec.save

    def timed(name: str, fn: Callable, *args: Any, cache_key: str | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            return run_stage(name, fn, *args, cache_key=cache_key)
        except WandaPipelineError:
            raise
        except Exception as exc:  # a library failed inside a stage (exit 5), or hides an interrupt
            raise stage_failure(name, exc, _inputs(args)) from exc
        finally:
            result.seconds[name] = result.seconds.get(name, 0.0) + time.perf_counter() - t0

    if checked is None:
        checked = timed("preflight", preflight, spec, tracker, outputs)
    plugins = checked.plugins
    tags = {"pipeline": pipeline, **(run_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_ctx = tracker.run(pipeline, tags=tags, nested=bool(parent_run_id)) if tracker else _no_run()
    with run_ctx as run_id:
        result.mlflow_run_id = run_id
        loaded = timed("load", stages.load, spec.model, spec.engine.stream)
        if plugins.quantizer is not None and "compressed-tensors" in _formats(spec, save, tracker):
            from wanda_pipeline.export.compressed_tensors import preflight as export_preflight

            # the group size must fit the model's linears: fail now, not after pruning
            timed("preflight-export", export_preflight, loaded.model, plugins.quantizer, spec.engine.include,
                  spec.engine.exclude)
        windows = None
        calibrated = plugins.quantizer if calibrated_stats(plugins.quantizer) else None  # quantizes while pruning
        # reconstruction and a calibrated quantizer need the inputs too
        if plugins.pruner.required_stats() or spec.reconstruct is not None or calibrated is not None:
            key = stages.calibration_key(spec.calibration, loaded)
            windows = timed("calibrate", stages.calibrate, spec.calibration, loaded, cache_key=key)
        target = plugins.pruner.config.target_sparsity
        result.params = {
            "pipeline": pipeline,
            "model": {**spec.model.model_dump(), "fingerprint": loaded.info.fingerprint,
                      "family": loaded.info.family, "n_blocks": loaded.info.n_blocks},
            "pruner": {"name": spec.pruner.name, **plugins.pruner.config.model_dump()},
            "target_sparsity": target,
            "allocation": spec.allocation.model_dump(),
            "reconstruct": spec.reconstruct.model_dump() if spec.reconstruct is not None else "none",
            "calibration": {**spec.calibration.model_dump(), "seqlen_used": windows.seqlen if windows else None,
                            "windows_digest": windows.digest if windows else None},
            "quantizer": ({"name": spec.quantizer.name, **plugins.quantizer.config.model_dump()}
                          if plugins.quantizer else "none"),
            "engine": spec.engine.model_dump(),
            "versions": _versions(),
        }
        if tracker:
            from wanda_pipeline.tracking.record import log_start

            log_start(tracker, result.params, spec.model_dump(by_alias=True))

        dense, result.dense_examples = dict(dense_metrics or {}), dict(dense_examples or {})
        scored = {k: v for k, v in plugins.evaluators.items() if k != "sparsity"}
        if spec.dense_baseline and not dense and scored:
            dense_results = timed("evaluate-dense", stages.evaluate, loaded.model, loaded.tokenizer, scored)
            dense, result.dense_examples = _metrics_of(dense_results), _examples_of(dense_results)
        outcome = timed("prune", stages.prune, loaded, windows, plugins.pruner, spec, progress, calibrated)
        metrics: dict[str, float] = {f"counter_{k}": v for k, v in outcome.counters.items()}
        if plugins.quantizer is not None:
            q = timed("quantize", stages.quantize, loaded.model, plugins.quantizer, spec.engine, outcome)
            metrics.update({"quant_bits_per_weight": q.bits_per_weight, "quant_model_bytes": q.model_bytes,
                            "quant_dense_model_bytes": q.dense_model_bytes, "quant_zeros_kept": q.zeros_after,
                            "quant_seconds": q.seconds})
        results = timed("evaluate", stages.evaluate, loaded.model, loaded.tokenizer, plugins.evaluators)
        from wanda_pipeline.models import state_digest

        # What a reload must reproduce; a streamed model is never whole in memory.
        result.weights_digest = "" if outcome.streamed_to else state_digest(loaded.model)
        metrics.update(_metrics_of(results))
        for k, v in dense.items():
            if k in metrics and v and not is_companion(k, dense):  # no ratio of two stderrs
                metrics[f"{k}_vs_dense"] = metrics[k] / v
        result.metrics = {k: v for k, v in metrics.items() if not k.startswith("sparsity_block_")}
        result.dense, result.block_targets = dense, outcome.block_ratios
        result.protocols = {k: r.protocol for k, r in results.items()}
        provenance = {**result.params, "metrics": result.metrics, "dense": dense,
                      "block_target_sparsity": outcome.block_ratios}
        if save is not None:  # before register: a version is registered only once everything else worked
            result.saved = timed("save", stages.save, loaded, save, provenance, spec, plugins.quantizer)
        if tracker:
            from wanda_pipeline.tracking.record import log_results

            log_results(tracker, metrics, dense, outcome.block_ratios, results, result.weights_digest,
                        outcome.engine.block_metrics(), result.dense_examples)
            timed("register", _register, tracker, spec, pipeline, loaded, result, provenance, target,
                  plugins.quantizer, _examples_of(results))
        _cleanup(outcome, spec)
        clock = {f"time_{k.replace('-', '_')}_s": v for k, v in result.seconds.items()}
        clock["peak_rss_bytes"] = stages.peak_rss_bytes()
        result.metrics.update(clock)
        if tracker:
            tracker.log_metrics(clock)
    return result


def _inputs(args: tuple) -> str | None:
    """The sources and paths a stage was given: named in its error when the library's does not say."""
    names = [v for a in args for k in ("path", "source") if isinstance(v := getattr(a, k, None), str) and v]
    return ", ".join(dict.fromkeys(names)) or None


def _formats(spec: PipelineSpec, save: SaveSpec | None, tracker) -> set[str]:
    return ({spec.registration.folder_format} if tracker else set()) | ({save.format} if save else set())


def _cleanup(outcome, spec: PipelineSpec) -> None:
    """After success: drop the checkpoint (unless kept) and a streamed model's staging shards."""
    import shutil

    from wanda_pipeline.engine.checkpoint import remove_checkpoint

    if outcome.checkpoint_dir and not spec.engine.keep_checkpoints:
        remove_checkpoint(outcome.checkpoint_dir)
    if outcome.streamed_to:
        shutil.rmtree(outcome.streamed_to, ignore_errors=True)


def _register(tracker, spec: PipelineSpec, pipeline: str, loaded, result: RunResult, provenance: dict,
              target: float, quantizer: Any = None, examples: dict | None = None) -> None:
    """Log the model to the run; if registration is on, hand it to the promotion policy."""
    from wanda_pipeline.tracking.promotion import log_model, register_and_promote

    reg = spec.registration
    fmt = reg.folder_format
    result.model_uri = log_model(tracker, loaded, fmt, pipeline, result.metrics.get("sparsity_total"),
                                 lambda out: stages.export_model(loaded, out, fmt, provenance, spec, quantizer))
    if not reg.enabled:
        return
    m = result.metrics
    tags = {"pipeline": pipeline, "pruner": spec.pruner.name, "sparsity": f"{m.get('sparsity_total', 0):.4f}",
            "pattern": provenance["pruner"].get("pattern", "unstructured")}
    tags.update({f"metric.{k}": f"{v:.6g}" for k, v in m.items()})
    registration = register_and_promote(tracker, reg, pipeline, result.model_uri, m, result.dense, target, tags,
                                        examples=examples, dense_examples=result.dense_examples)
    result.registration = registration.as_dict()


class _no_run:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False
