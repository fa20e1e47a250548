"""The layer engine: run calibration activations through one decoder block at a time,
collect the statistics a visitor declares, and hand them over.

It knows nothing of particular pruners, Prefect or MLflow. Where weights come from
(:mod:`.source`), where finished blocks go (:mod:`.sink`) and resuming (:mod:`.checkpoint`)
are pluggable; the loop is the same for all of them. Only the current block and its
activations are on the execution device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from wanda_pipeline.engine.batching import auto_batch_size
from wanda_pipeline.engine.block import BlockContext, check_passes, is_block_level
from wanda_pipeline.engine.capture import Captured, capture
from wanda_pipeline.engine.checkpoint import Checkpoint
from wanda_pipeline.engine.onepass import OnePass, join_calls
from wanda_pipeline.engine.resume import block_state, restore_finished
from wanda_pipeline.engine.sink import BlockSink, ModelSink
from wanda_pipeline.engine.source import BlockSource, ModelSource
from wanda_pipeline.models import find_linears, linear_weight_view
from wanda_pipeline.stats import make_accumulators

log = logging.getLogger(__name__)


class BlockVisitor(Protocol):
    """What the engine calls for each block. ``visit`` may change the block's weights.

    A visitor that supports resuming also has ``block_state(index, linears) -> dict`` and
    ``restore_state(index, linears, state)``. A block-level visitor has ``visit_block(ctx)``
    instead of ``visit``: it gets the whole block (see :mod:`.block`)."""

    def required_stats(self) -> set[str]: ...

    def visit(
        self, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: dict[str, dict[str, torch.Tensor]]
    ) -> bool:
        """Return True if the weights changed, so the engine recomputes the block outputs."""
        ...


@dataclass
class EngineReport:
    blocks: int = 0
    seconds_per_block: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    peak_device_bytes: list[int] = field(default_factory=list)  # per block; empty off CUDA
    resumed_at: int = 0

    def block_metrics(self) -> list[dict[str, float]]:
        """One row per block (``step`` = block index), for a tracker's per-step metrics."""
        rows = []
        for i, seconds in enumerate(self.seconds_per_block):
            row = {"step": self.resumed_at + i, "block_seconds": seconds}
            if i < len(self.peak_device_bytes):
                row["peak_device_bytes"] = float(self.peak_device_bytes[i])
            rows.append(row)
        return rows


def _to(obj: Any, device: torch.device, memo: dict[int, torch.Tensor]) -> Any:
    """Move arguments to the device; ``memo`` moves each distinct (interned) tensor once."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerEngine:
    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int | str = 1,
        offload_activations: bool = True,
        include: str | None = None,
        exclude: str | None = None,
        progress: bool = True,
        passes: int = 2,
        threads: int | None = None,
    ):
        if passes not in (1, 2):
            raise ValueError(f"passes must be 1 or 2, got {passes!r}")
        self.device = torch.device(device)
        self.batch_size = batch_size  # an int, or "auto": chosen from free memory at capture
        self.passes = passes
        self.threads = threads
        self._samples: int | None = None  # sequences in the block call now running
        self.offload_activations = offload_activations
        self.include = include
        self.exclude = exclude
        self.progress = progress

    @property
    def store_device(self) -> torch.device:
        """Where activations between blocks live: the CPU when offloading, else the device."""
        return torch.device("cpu") if self.offload_activations else self.device

    def capture(self, model: nn.Module, tokens: torch.Tensor, source: BlockSource | None = None) -> Captured:
        """Every block's own inputs (see :mod:`.capture`), at the cost of the embeddings."""
        source = source or ModelSource(model)
        input_device = source.prepare_outer()
        batch = self.batch_size
        if batch == "auto":
            batch = auto_batch_size(model, tokens, self.device)
        return capture(model, source.blocks, tokens, int(batch), self.store_device, input_device)

    def run(self, model: nn.Module, tokens: torch.Tensor | None, visitor: BlockVisitor,
            source: BlockSource | None = None, sink: BlockSink | None = None,
            checkpoint: Checkpoint | None = None) -> EngineReport:
        if self.threads is None:
            return self._run(model, tokens, visitor, source, sink, checkpoint)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._run(model, tokens, visitor, source, sink, checkpoint)
        finally:
            torch.set_num_threads(before)

    def _run(self, model: nn.Module, tokens: torch.Tensor | None, visitor: BlockVisitor,
             source: BlockSource | None, sink: BlockSink | None, checkpoint: Checkpoint | None) -> EngineReport:
        source = source or ModelSource(model)
        sink = sink or ModelSink()
        report = EngineReport(blocks=len(source.blocks))
        needed = set(visitor.required_stats())
        check_passes(visitor, self.passes)
        start = checkpoint.start(len(source.blocks)) if checkpoint else 0
        report.resumed_at = start
        if start:
            print(f"resuming at block {start} of {len(source.blocks)}", flush=True)
            restore_finished(source, sink, visitor, checkpoint, start, self.device, self.include, self.exclude)
        if start >= len(source.blocks):
            return report

        inputs: list[torch.Tensor] = []
        captured = None
        if needed or is_block_level(visitor):
            t0 = time.perf_counter()
            captured = self.capture(model, tokens, source)
            report.capture_seconds = time.perf_counter() - t0
            inputs = checkpoint.inputs(start) if start else captured.inputs

        for index in self._iter(range(start, len(source.blocks))):
            t0 = time.perf_counter()
            self._reset_peak()
            block = source.load(index, self.device)
            linears = find_linears(block, self.include, self.exclude)
            if captured is None:
                visitor.visit(index, block, linears, {})
                outputs: list[torch.Tensor] = []
            else:
                calls = captured.block_calls(index)
                if self.passes == 1 and getattr(visitor, "one_pass", False):
                    outputs = self.prune_in_forward(visitor, index, block, linears, inputs, calls, needed)
                else:
                    stats, outputs = self.observe(block, linears, inputs, calls, needed)
                    if not is_block_level(visitor):
                        changed = visitor.visit(index, block, linears, stats)
                    else:  # the dense outputs are this observe forward's
                        changed = visitor.visit_block(BlockContext(index, block, linears, stats, inputs, calls,
                                                                   outputs, self.device, self.store_device, self.call))
                    if changed:
                        outputs = self.forward(block, inputs, calls)
                    del stats
            if checkpoint is not None:
                checkpoint.save(index, block_state(visitor, index, linears), outputs)
            sink.put(index, block)
            inputs = outputs
            report.seconds_per_block.append(time.perf_counter() - t0)
            peak = self._peak()
            if peak is not None:
                report.peak_device_bytes.append(peak)
        return report

    def observe(self, block: nn.Module, linears: dict[str, nn.Module], inputs: list[torch.Tensor],
                calls: list[tuple[tuple, dict]], needed: set[str]) -> tuple[dict, list[torch.Tensor]]:
        """Statistics of every linear's inputs over one forward of the dense block, and the
        block outputs. (A one-pass mode that prunes each linear in a forward-pre-hook before
        it runs would replace only this step.)"""
        accs = {name: make_accumulators(needed, linear_weight_view(lin).shape[1], self.device)
                for name, lin in linears.items()}
        handles = [lin.register_forward_hook(self._observer(accs[name])) for name, lin in linears.items()]
        try:
            outputs = self.forward(block, inputs, calls)
        finally:
            for h in handles:
                h.remove()
        return {name: {k: a.value for k, a in acc.items()} for name, acc in accs.items()}, outputs

    def prune_in_forward(self, visitor: BlockVisitor, index: int, block: nn.Module, linears: dict[str, nn.Module],
                         inputs: list[torch.Tensor], calls: list[tuple[tuple, dict]],
                         needed: set[str]) -> list[torch.Tensor]:
        """passes=1: one forward of all calibration batches joined; each linear is pruned by a
        pre-hook when its input arrives (see :mod:`.onepass`). Returns the outputs per batch."""
        hidden, rest, kwargs = join_calls(inputs, calls)
        sizes = [h.shape[0] for h in inputs]
        one = OnePass(visitor, index, block, linears, needed, self.device, hidden.shape[0])
        out = one.run(lambda: self.forward(block, [hidden], [(rest, kwargs)])[0])
        parts = out.split(sizes, dim=0)
        return [p.clone() for p in parts] if len(parts) > 1 else [out]  # own storage: checkpoints save each

    def forward(self, block: nn.Module, inputs: list[torch.Tensor],
                calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        memo: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for hidden, call in zip(inputs, calls, strict=True):
                outs.append(self.call(block, hidden, call, memo).detach().to(self.store_device))
        return outs

    def call(self, block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict],
             memo: dict[int, torch.Tensor]) -> torch.Tensor:
        """One batch through the block on the device, in the caller's grad mode: every forward of
        the engine (and of a block-level visitor) runs through here."""
        args, kw = _to(call[0], self.device, memo), _to(call[1], self.device, memo)
        self._samples = hidden.shape[0]  # for the statistics hooks
        return _hidden(block(hidden.to(self.device), *args, **kw))

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def _observer(self, accs: dict):
        def hook(_module, args, _out):
            x = args[0].detach()
            for acc in accs.values():
                acc.update(x, self._samples)

        return hook

    def _iter(self, indices):
        return tqdm(indices, desc="blocks", unit="block", disable=not self.progress, leave=False)

