"""Prune a model: the engine visitor that applies a pruner block by block."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from wanda_pipeline.allocation import AllocationConfig, OutlierScan, block_ratios
from wanda_pipeline.engine import EngineReport, LayerEngine
from wanda_pipeline.errors import PluginError
from wanda_pipeline.models import find_blocks, linear_weight_view
from wanda_pipeline.plugins import Pruner
from wanda_pipeline.sparsity import apply_mask, pattern_sparsity


@dataclass
class PruneOutcome:
    block_ratios: list[float]
    engine: EngineReport
    counters: dict[str, float] = field(default_factory=dict)


class PruneVisitor:
    def __init__(self, pruner: Pruner, ratios: list[float]):
        self.pruner = pruner
        self.ratios = ratios

    def required_stats(self) -> set[str]:
        return set(self.pruner.required_stats())

    def visit(self, index: int, block: nn.Module, linears: dict, stats: dict) -> bool:
        for name, lin in linears.items():
            weight = linear_weight_view(lin)
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
        return True


def prune_model(
    model: nn.Module,
    tokens: torch.Tensor | None,
    pruner: Pruner,
    engine: LayerEngine,
    allocation: AllocationConfig | None = None,
) -> PruneOutcome:
    allocation = allocation or AllocationConfig()
    _, blocks = find_blocks(model)
    target = pattern_sparsity(pruner.config.pattern, pruner.config.sparsity)
    outliers = None
    if allocation.method == "owl":
        scan = OutlierScan(allocation.owl_m)
        engine.run(model, tokens, scan)
        outliers = scan.ratios
    ratios = block_ratios(allocation, len(blocks), target, outliers)
    visitor = PruneVisitor(pruner, ratios)
    if visitor.required_stats() and tokens is None:
        raise PluginError("this pruner needs calibration data, but none was given")
    report = engine.run(model, tokens, visitor)
    counters = dict(getattr(pruner, "counters", {}) or {})
    return PruneOutcome(block_ratios=ratios, engine=report, counters=counters)
