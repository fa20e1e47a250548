"""The pipeline stages as plain functions: load, calibrate, prune, quantize, evaluate, save.

Only :func:`wanda_pipeline.run.execute` knows their order. None of them knows about
Prefect or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from wanda_pipeline.config import CalibrationSpec, EngineSpec, ModelSpec, PipelineSpec, SaveSpec
from wanda_pipeline.data import Windows, calibration_windows, default_seqlen, local_document_file
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import OutputError, PluginError, RunError, WandaPipelineError
from wanda_pipeline.models import ModelInfo, find_blocks, find_linears, linear_weight_view, load_model
from wanda_pipeline.plugins import EvalResult, Registry
from wanda_pipeline.pruning import PruneOutcome, finish_streaming, prune_model, streaming_io
from wanda_pipeline.quantizers.calibrated import QuantTally, calibrated_stats, quantize_linear


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
    seconds: float = 0.0  # in the quantizer itself (a calibrated one runs inside the prune stage)


def build_plugins(spec: PipelineSpec, registry: Registry,
                  problems: list[WandaPipelineError] | None = None) -> Plugins:
    """Create (and so validate) every plugin. With ``problems``, collect each failure there
    and leave that plugin out instead of stopping at the first."""

    def make(kind: str, name: str, options: dict) -> Any:
        try:
            return registry.create(kind, name, options)
        except WandaPipelineError as exc:
            if problems is None:
                raise
            problems.append(exc)
            return None

    pruner = make("pruner", spec.pruner.name, spec.pruner.options())
    quantizer = make("quantizer", spec.quantizer.name, spec.quantizer.options()) if spec.quantizer else None
    evaluators = {}
    for e in spec.evaluators:
        key = e.name if e.name not in evaluators else f"{e.name}_{len(evaluators)}"
        made = make("evaluator", e.name, e.options())
        if made is not None:
            evaluators[key] = made
    return Plugins(pruner=pruner, quantizer=quantizer, evaluators=evaluators)


def load(spec: ModelSpec, stream: bool = False) -> Loaded:
    model, tokenizer, info = load_model(spec.source, spec.dtype, spec.trust_remote_code, spec.revision, stream=stream)
    return Loaded(model, tokenizer, info)


def calibrate(spec: CalibrationSpec, loaded: Loaded) -> Windows:
    seqlen = default_seqlen(loaded.info.max_positions, spec.seqlen)
    return calibration_windows(spec.source, loaded.tokenizer, spec.nsamples, seqlen, spec.seed, spec.path,
                               model=loaded.model)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def calibration_key(spec: CalibrationSpec, loaded: Loaded) -> str | None:
    """A cache key on content: the settings, the model's weights fingerprint, the tokenizer
    files and the data file's bytes. None (do not cache) when the data comes from the hub."""
    local = local_document_file(spec.source, "train", spec.path) if spec.source != "self" else None
    if spec.source != "self" and (local is None or not local.exists()):
        return None
    h = hashlib.sha256(json.dumps([spec.model_dump(), loaded.info.fingerprint, type(loaded.tokenizer).__name__,
                                   len(loaded.tokenizer)], sort_keys=True).encode())
    folder = Path(loaded.info.resolved_path)
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        if (folder / name).is_file():
            h.update(file_digest(folder / name).encode())
    if local is not None:
        h.update(file_digest(local).encode())
    return "calib-" + h.hexdigest()[:32]


def make_engine(spec: EngineSpec, progress: bool = True) -> LayerEngine:
    return LayerEngine(device=spec.device, batch_size=spec.batch_size, offload_activations=spec.offload_activations,
                       include=spec.include, exclude=spec.exclude, progress=progress, passes=spec.passes,
                       threads=spec.threads)


def prune(loaded: Loaded, windows: Windows | None, pruner: Any, spec: PipelineSpec,
          progress: bool = True, quantizer: Any = None) -> PruneOutcome:
    """Prune (and, for a calibrated ``quantizer``, quantize in the same block loop)."""
    from wanda_pipeline.modelcheck import selection_problems

    e = spec.engine
    for problem in selection_problems(find_blocks(loaded.model)[1], e):  # preflight cannot see a hub model's
        raise problem
    tokens = windows.tokens if windows is not None else None
    io = streaming_io(loaded.model, spec.save.path if spec.save else None)
    outcome = prune_model(loaded.model, tokens, pruner, make_engine(e, progress), spec.allocation,
                          checkpoint_dir=e.checkpoint_dir, resume=e.resume, reconstruct=spec.reconstruct,
                          source=io[0] if io else None, sink=io[1] if io else None, quantizer=quantizer)
    if io:
        finish_streaming(loaded.model, io, outcome)
    return outcome


def quantize(model: nn.Module, quantizer: Any, engine: EngineSpec,
             outcome: PruneOutcome | None = None) -> QuantizeReport:
    """Quantise every prunable linear, one at a time, and fail if a pruned zero moved. A
    calibrated quantizer already ran inside the prune stage's block loop: report what it did."""
    if calibrated_stats(quantizer):
        if outcome is None or outcome.quantized is None:
            raise RunError(f"quantizer {type(quantizer).__name__} is calibrated: it runs in the prune stage "
                           "(pass it to stages.prune), not on a finished model")
        tally = outcome.quantized
    else:
        tally = QuantTally()
        _, blocks = find_blocks(model)
        for b, block in enumerate(blocks):
            for name, lin in find_linears(block, engine.include, engine.exclude).items():
                quantize_linear(quantizer, linear_weight_view(lin), None, f"block {b} {name!r}", tally)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quant_bytes_dense = tally.numel * next(model.parameters()).element_size()
    model_bytes = int(dense_bytes - quant_bytes_dense + tally.bits / 8)
    return QuantizeReport(
        bits_per_weight=tally.bits / tally.numel if tally.numel else 0.0,
        model_bytes=model_bytes, dense_model_bytes=dense_bytes, quantized_linears=tally.linears,
        zeros_before=tally.zeros_before, zeros_after=tally.zeros_after, seconds=tally.seconds,
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


def save(loaded: Loaded, spec: SaveSpec, provenance: dict, pipeline: PipelineSpec, quantizer: Any = None) -> str:
    """Write the model to ``spec.path`` atomically, in ``spec.format``."""
    try:
        return str(export_model(loaded, spec.path, spec.format, provenance, pipeline, quantizer, spec.overwrite))
    except FileExistsError:
        raise OutputError(f"save folder {spec.path} appeared while the run was going (another run?); nothing was "
                          f"written. Choose another folder or set save.overwrite") from None
    except OSError as exc:
        raise OutputError(f"could not write {spec.path}: {exc}; nothing was left half-written") from exc


def export_model(loaded: Loaded, out_dir: str | Path, fmt: str, provenance: dict, pipeline: PipelineSpec,
                 quantizer: Any = None, overwrite: bool = False) -> Path:
    """The one place that turns a pruned model into a folder, in any format."""
    from wanda_pipeline.export import save as export_save

    return export_save(loaded.model, loaded.tokenizer, out_dir, fmt, provenance, quantizer=quantizer,
                       pattern=pipeline.pruner.options().get("pattern", "unstructured"),
                       include=pipeline.engine.include, exclude=pipeline.engine.exclude, overwrite=overwrite)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
