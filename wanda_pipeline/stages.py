"""The pipeline stages as plain functions: load, calibrate, prune, quantize, evaluate.

The Prefect flow wraps each in a task; the ``prune`` CLI calls them directly. None of
them knows about Prefect or MLflow.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wanda_pipeline.config import CalibrationSpec, EngineSpec, ModelSpec, PipelineSpec
from wanda_pipeline.data import Windows, calibration_windows, default_seqlen
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import PluginError, RunError, WandaPipelineError
from wanda_pipeline.models import ModelInfo, find_blocks, find_linears, linear_weight_view, load_model
from wanda_pipeline.plugins import EvalResult, Registry
from wanda_pipeline.pruning import PruneOutcome, finish_streaming, prune_model, streaming_io


@dataclass
class Plugins:
    """Instantiated (config-validated) plugins of one pipeline."""

    pruner: Any
    quantizer: Any | None
    evaluators: dict[str, Any]


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    info: ModelInfo


@dataclass
class QuantizeReport:
    bits_per_weight: float
    model_bytes: int
    dense_model_bytes: int
    quantized_linears: int
    zeros_before: int
    zeros_after: int


@dataclass
class StageClock:
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def build_plugins(spec: PipelineSpec, registry: Registry) -> Plugins:
    """Create every plugin up front, so a bad name or option fails before any heavy work."""
    pruner = registry.create("pruner", spec.pruner.name, spec.pruner.options())
    quantizer = registry.create("quantizer", spec.quantizer.name, spec.quantizer.options()) if spec.quantizer else None
    evaluators = {}
    for e in spec.evaluators:
        key = e.name if e.name not in evaluators else f"{e.name}_{len(evaluators)}"
        evaluators[key] = registry.create("evaluator", e.name, e.options())
    return Plugins(pruner=pruner, quantizer=quantizer, evaluators=evaluators)


def load(spec: ModelSpec, stream: bool = False) -> Loaded:
    model, tokenizer, info = load_model(spec.source, spec.dtype, spec.trust_remote_code, spec.revision, stream=stream)
    return Loaded(model, tokenizer, info)


def calibrate(spec: CalibrationSpec, loaded: Loaded) -> Windows:
    seqlen = default_seqlen(loaded.info.max_positions, spec.seqlen)
    return calibration_windows(spec.source, loaded.tokenizer, spec.nsamples, seqlen, spec.seed, spec.path,
                               model=loaded.model)


def make_engine(spec: EngineSpec, progress: bool = True) -> LayerEngine:
    return LayerEngine(device=spec.device, batch_size=spec.batch_size, offload_activations=spec.offload_activations,
                       include=spec.include, exclude=spec.exclude, progress=progress)


def prune(loaded: Loaded, windows: Windows | None, pruner: Any, spec: PipelineSpec,
          progress: bool = True) -> PruneOutcome:
    tokens = windows.tokens if windows is not None else None
    e = spec.engine
    io = streaming_io(loaded.model, spec.save)
    outcome = prune_model(loaded.model, tokens, pruner, make_engine(e, progress), spec.allocation,
                          checkpoint_dir=e.checkpoint_dir, resume=e.resume,
                          source=io[0] if io else None, sink=io[1] if io else None)
    if io:
        finish_streaming(loaded.model, io, outcome)
    return outcome


def quantize(model: nn.Module, quantizer: Any, engine: EngineSpec) -> QuantizeReport:
    """Quantise every prunable linear, one at a time, and fail if a pruned zero moved."""
    _, blocks = find_blocks(model)
    total_bits = 0.0
    quant_numel = 0
    zeros_before = zeros_after = 0
    count = 0
    for b, block in enumerate(blocks):
        for name, lin in find_linears(block, engine.include, engine.exclude).items():
            weight = linear_weight_view(lin)
            zero = weight == 0
            try:
                new = quantizer.quantize_weight(weight.detach().clone())
            except Exception as exc:
                raise PluginError(f"quantizer {type(quantizer).__name__} crashed on block {b} {name!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            if new.shape != weight.shape:
                raise PluginError(f"quantizer {type(quantizer).__name__} changed the shape of {name!r}")
            moved = int((new[zero] != 0).sum())
            if moved:
                raise RunError(f"quantizer {type(quantizer).__name__} turned {moved} pruned zeros of block {b} "
                               f"{name!r} non-zero; a quantizer must keep the sparsity mask")
            with torch.no_grad():
                weight.copy_(new)
            zeros_before += int(zero.sum())
            zeros_after += int((weight == 0).sum())
            total_bits += quantizer.bits_per_weight(tuple(weight.shape)) * weight.numel()
            quant_numel += weight.numel()
            count += 1
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quant_bytes_dense = quant_numel * next(model.parameters()).element_size()
    model_bytes = int(dense_bytes - quant_bytes_dense + total_bits / 8)
    return QuantizeReport(
        bits_per_weight=total_bits / quant_numel if quant_numel else 0.0,
        model_bytes=model_bytes, dense_model_bytes=dense_bytes, quantized_linears=count,
        zeros_before=zeros_before, zeros_after=zeros_after,
    )


def evaluate(model: nn.Module, tokenizer: Any, evaluators: dict[str, Any]) -> dict[str, EvalResult]:
    out = {}
    for key, ev in evaluators.items():
        try:
            result = ev.evaluate(model, tokenizer)
        except WandaPipelineError:
            raise
        except Exception as exc:
            raise PluginError(f"evaluator {key!r} crashed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, EvalResult):
            raise PluginError(f"evaluator {key!r} returned {type(result).__name__}, expected EvalResult")
        out[key] = result
    return out


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
