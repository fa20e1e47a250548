"""Prune a model: the engine visitor that applies a pruner block by block."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from wanda_pipeline.allocation import AllocationConfig, OutlierScan, block_ratios
from wanda_pipeline.data import tokens_digest
from wanda_pipeline.engine import (
    BlockSink,
    BlockSource,
    Checkpoint,
    EngineReport,
    LayerEngine,
    ModelSource,
    ShardSink,
    ShardSource,
)
from wanda_pipeline.engine.source import STREAM_ATTR
from wanda_pipeline.errors import PluginError
from wanda_pipeline.models import linear_weight_view
from wanda_pipeline.plugins import Pruner
from wanda_pipeline.quantizers.calibrated import CalibratedQuantize, QuantTally, calibrated_stats
from wanda_pipeline.settings import cache_dir
from wanda_pipeline.sparsity import apply_mask, pattern_sparsity


@dataclass
class PruneOutcome:
    block_ratios: list[float]
    engine: EngineReport
    counters: dict[str, float] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    streamed_to: str | None = None  # streaming: the folder the pruned shards were written to
    quantized: QuantTally | None = None  # a calibrated quantizer ran in the block loop


class PruneVisitor:
    one_pass = True  # visit() may be called linear by linear within a block (passes=1)

    def __init__(self, pruner: Pruner, ratios: list[float]):
        self.pruner = pruner
        self.ratios = ratios
        self._state: tuple[int, dict[str, torch.Tensor]] | None = None
        self.masks: dict[str, torch.Tensor] = {}  # this block's masks so far (True = pruned)

    def required_stats(self) -> set[str]:
        return set(self.pruner.required_stats())

    def visit(self, index: int, block: nn.Module, linears: dict, stats: dict) -> bool:
        # passes=1 visits one linear at a time: keep adding to this block's state
        state = self._state[1] if self._state is not None and self._state[0] == index else {}
        if not state:
            self.masks = {}
        for name, lin in linears.items():
            weight = linear_weight_view(lin)
            before = weight.clone()
            try:
                mask = self.pruner.prune(weight, stats.get(name, {}), self.ratios[index])
            except Exception as exc:
                raise PluginError(
                    f"pruner {type(self.pruner).__name__} crashed on block {index} linear {name!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape or mask.dtype != torch.bool:
                raise PluginError(
                    f"pruner {type(self.pruner).__name__} returned an invalid mask for {name!r}: "
                    f"expected a bool tensor of shape {tuple(weight.shape)}"
                )
            apply_mask(weight, mask)
            self.masks[name] = mask
            # A mask is enough to redo the block unless the pruner also updated weights (SparseGPT).
            if torch.equal(weight, before.masked_fill_(mask, 0)):
                state[f"{name}.mask"] = mask.detach().to("cpu")
            else:
                state[f"{name}.weight"] = weight.detach().to("cpu", copy=True)
            del before
        self._state = (index, state)
        return True

    def block_state(self, index: int, linears: dict) -> dict[str, torch.Tensor]:
        if self._state is None or self._state[0] != index:
            raise RuntimeError(f"no pruned state for block {index}")
        return self._state[1]

    def restore_state(self, index: int, linears: dict, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, lin in linears.items():
                weight = linear_weight_view(lin)
                if f"{name}.weight" in state:
                    weight.copy_(state[f"{name}.weight"].to(weight.device, weight.dtype))
                else:
                    apply_mask(weight, state[f"{name}.mask"].to(weight.device))


def run_fingerprint(source: BlockSource, tokens: torch.Tensor | None, pruner: Pruner,
                    allocation: AllocationConfig, engine: LayerEngine, quantizer=None,
                    reconstruct: BaseModel | None = None) -> dict:
    """What must match for a checkpoint to be resumed."""
    found = {
        "model": source.fingerprint(),
        "calibration": tokens_digest(tokens) if tokens is not None else None,
        "pruner": _plugin_id(pruner),
        "allocation": allocation.model_dump(mode="json"),
        "linears": {"include": engine.include, "exclude": engine.exclude},
        "batch_size": engine.batch_size,
        "passes": engine.passes,
    }
    # only when set: earlier runs' checkpoints (and auto folders) keep their fingerprint
    if quantizer is not None:
        found["quantizer"] = _plugin_id(quantizer)
    if reconstruct is not None:
        found["reconstruct"] = reconstruct.model_dump(mode="json")
    return found


def _plugin_id(plugin) -> dict:
    return {"class": f"{type(plugin).__module__}.{type(plugin).__qualname__}", **plugin.config.model_dump(mode="json")}


def auto_checkpoint_dir(fingerprint: dict) -> Path:
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "checkpoints" / key


def prune_model(
    model: nn.Module,
    tokens: torch.Tensor | None,
    pruner: Pruner,
    engine: LayerEngine,
    allocation: AllocationConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    source: BlockSource | None = None,
    sink: BlockSink | None = None,
    quantizer=None,
    reconstruct: BaseModel | None = None,
) -> PruneOutcome:
    """Prune ``model`` block by block. ``checkpoint_dir`` ("auto": a cache folder keyed by the
    run's fingerprint) makes the run resumable; ``source``/``sink`` stream weights from and to
    shards (default: the model in memory). A calibrated ``quantizer`` (one that declares
    statistics) quantizes each linear right after it is pruned, in the same loop; ``reconstruct``
    (a :class:`~wanda_pipeline.regional.config.ReconstructConfig`) fits each masked block to the
    dense block's outputs."""
    from wanda_pipeline.regional.visitor import BlockPruneVisitor, block_level_problems, is_block_level

    allocation = allocation or AllocationConfig()
    source = source or ModelSource(model)
    target = pattern_sparsity(pruner.config.pattern, pruner.config.sparsity)
    quantizer = quantizer if calibrated_stats(quantizer) else None
    block_level = is_block_level(pruner, reconstruct)
    if (pruner.required_stats() or block_level or quantizer is not None) and tokens is None:
        raise PluginError(f"this {'quantizer' if quantizer is not None else 'pruner'} needs calibration data, "
                          "but none was given")
    problems = block_level_problems(pruner, reconstruct, engine.passes, type(pruner).__name__)
    if problems:
        raise problems[0]
    outliers = None
    if allocation.method == "owl":
        scan = OutlierScan(allocation.owl_m)
        engine.run(model, tokens, scan, source=source, sink=_Release(source))
        outliers = scan.ratios
    ratios = block_ratios(allocation, len(source.blocks), target, outliers)
    prune_visitor = BlockPruneVisitor(pruner, ratios, reconstruct) if block_level else PruneVisitor(pruner, ratios)
    visitor = CalibratedQuantize(prune_visitor, quantizer) if quantizer is not None else prune_visitor
    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = run_fingerprint(source, tokens, pruner, allocation, engine, quantizer, reconstruct)
        folder = auto_checkpoint_dir(fingerprint) if str(checkpoint_dir) == "auto" else Path(checkpoint_dir)
        checkpoint = Checkpoint(folder, fingerprint, resume=resume)
    report = engine.run(model, tokens, visitor, source=source, sink=sink, checkpoint=checkpoint)
    counters = {**(getattr(pruner, "counters", {}) or {}), **getattr(prune_visitor, "counters", {})}
    if quantizer is not None:
        counters.update({f"quantizer_{k}": v for k, v in (getattr(quantizer, "counters", {}) or {}).items()})
    return PruneOutcome(block_ratios=ratios, engine=report, counters=counters,
                        checkpoint_dir=str(checkpoint.folder) if checkpoint else None,
                        quantized=visitor.tally if quantizer is not None else None)


class _Release:
    """The sink of a read-only pass: give the block back without writing it anywhere."""

    def __init__(self, source: BlockSource):
        self.source = source

    def put(self, index: int, block: nn.Module) -> None:
        release = getattr(self.source, "release", None)
        if release is not None:
            release(index)
        else:
            block.to("cpu")


def streaming_io(model: nn.Module, save: str | None) -> tuple[ShardSource, ShardSink] | None:
    """For a streamed model: read blocks from its shards and write the pruned ones to
    ``<save>.partial`` (or a cache folder), renamed into place when the model is saved."""
    folder = getattr(model, STREAM_ATTR, None)
    if folder is None:
        return None
    source = ShardSource(model, folder)
    key = hashlib.sha256(f"{folder}|{save}".encode()).hexdigest()[:16]
    staging = Path(f"{save}.partial") if save else cache_dir() / "streamed" / key
    if staging.exists():
        shutil.rmtree(staging)
    return source, ShardSink(staging, source.blocks_path, release=source.release)


def finish_streaming(model: nn.Module, io: tuple[ShardSource, ShardSink], outcome: PruneOutcome) -> None:
    """Write what lies outside the blocks and the index; from now on the model streams from there."""
    source, sink = io
    sink.finish(model, source.folder, source.weight_map, source.keys)
    setattr(model, STREAM_ATTR, str(sink.folder))
    outcome.streamed_to = str(sink.folder)
