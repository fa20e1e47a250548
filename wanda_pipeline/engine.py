"""The layer engine: stream calibration activations through one decoder block at a
time, collect the statistics a visitor declares, and hand them over.

It knows nothing of particular pruners, Prefect or MLflow. Only one block is on the
execution device at a time; the activations between blocks can live on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.stats import make_accumulators


class BlockVisitor(Protocol):
    """What the engine calls for each block. ``visit`` may change the block's weights."""

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
    peak_device_bytes: int | None = None


class _Captured(Exception):
    pass


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _hidden(out: Any) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older ones and GPT-2 return a tuple.
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerEngine:
    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        offload_activations: bool = True,
        include: str | None = None,
        exclude: str | None = None,
        progress: bool = True,
    ):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.offload_activations = offload_activations
        self.include = include
        self.exclude = exclude
        self.progress = progress

    @property
    def store_device(self) -> torch.device:
        return torch.device("cpu") if self.offload_activations else self.device

    def capture(self, model: nn.Module, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
        """Inputs of the first block, with every keyword argument the model passes it
        (attention mask, position ids, rotary ``position_embeddings``...)."""
        _, blocks = find_blocks(model)
        inputs: list[torch.Tensor] = []
        kwargs_list: list[dict] = []

        def grab(_module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            inputs.append(hidden.detach().to(self.store_device))
            kwargs_list.append(_to({k: v for k, v in kwargs.items() if k != "hidden_states"}, self.store_device))
            raise _Captured

        handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        model_device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for start in range(0, tokens.shape[0], self.batch_size):
                    batch = tokens[start : start + self.batch_size].to(model_device)
                    try:
                        model(input_ids=batch, use_cache=False)
                    except _Captured:
                        pass
        finally:
            handle.remove()
        return inputs, kwargs_list

    def run(self, model: nn.Module, tokens: torch.Tensor, visitor: BlockVisitor) -> EngineReport:
        report = EngineReport()
        _, blocks = find_blocks(model)
        needed = set(visitor.required_stats())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        if not needed:
            # Nothing to observe: visit each block in place, no activations at all.
            for index, block in enumerate(self._iter(blocks)):
                t0 = time.perf_counter()
                block.to(self.device)
                visitor.visit(index, block, find_linears(block, self.include, self.exclude), {})
                block.to("cpu")
                report.seconds_per_block.append(time.perf_counter() - t0)
            report.blocks = len(blocks)
            return report

        t0 = time.perf_counter()
        inputs, kwargs_list = self.capture(model, tokens)
        report.capture_seconds = time.perf_counter() - t0

        for index, block in enumerate(self._iter(blocks)):
            t0 = time.perf_counter()
            block.to(self.device)
            linears = find_linears(block, self.include, self.exclude)
            accs = {
                name: make_accumulators(needed, linear_weight_view(lin).shape[1], self.device)
                for name, lin in linears.items()
            }
            handles = [lin.register_forward_hook(self._observer(accs[name])) for name, lin in linears.items()]
            try:
                outputs = self._forward(block, inputs, kwargs_list)
            finally:
                for h in handles:
                    h.remove()
            stats = {name: {k: a.value for k, a in acc.items()} for name, acc in accs.items()}
            changed = visitor.visit(index, block, linears, stats)
            del stats, accs
            if changed:
                outputs = self._forward(block, inputs, kwargs_list)
            block.to("cpu")
            inputs = outputs
            report.seconds_per_block.append(time.perf_counter() - t0)
        report.blocks = len(blocks)
        if self.device.type == "cuda":
            report.peak_device_bytes = torch.cuda.max_memory_allocated(self.device)
        return report

    def _forward(self, block: nn.Module, inputs: list[torch.Tensor], kwargs_list: list[dict]) -> list[torch.Tensor]:
        outs = []
        with torch.no_grad():
            for hidden, kwargs in zip(inputs, kwargs_list, strict=True):
                out = _hidden(block(hidden.to(self.device), **_to(kwargs, self.device)))
                outs.append(out.detach().to(self.store_device))
        return outs

    @staticmethod
    def _observer(accs: dict):
        def hook(_module, args, _out):
            x = args[0].detach()
            for acc in accs.values():
                acc.update(x)

        return hook

    def _iter(self, blocks: nn.ModuleList):
        return tqdm(blocks, desc="blocks", unit="block", disable=not self.progress, leave=False)
