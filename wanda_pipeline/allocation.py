"""Per-block sparsity allocation: uniform, an explicit map, or OWL (Yin et al. 2023)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from wanda_pipeline.errors import ConfigError
from wanda_pipeline.models import linear_weight_view
from wanda_pipeline.sparsity import wanda_metric


class AllocationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["uniform", "per_layer", "owl"] = "uniform"
    ratios: dict[int, float] | None = Field(None, description="per_layer: block index -> sparsity")
    owl_m: float = Field(5.0, gt=0, description="OWL: outlier threshold M (times the block mean)")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="OWL: max deviation from the target")

    @model_validator(mode="after")
    def _needs_ratios(self):
        if self.method == "per_layer" and not self.ratios:
            raise ValueError("method 'per_layer' needs `ratios`, e.g. {0: 0.4, 1: 0.6}")
        for k, v in (self.ratios or {}).items():
            if not 0 <= v < 1:
                raise ValueError(f"ratios[{k}] must be in [0, 1), got {v}")
        return self


def owl_ratios(outlier_ratios: list[float], target: float, lamda: float) -> list[float]:
    """OWL: blocks with more outliers get lower sparsity. Outlier ratios are rescaled to
    [0, 2*lambda] and shifted so the block sparsities average to ``target``."""
    lod = torch.tensor(outlier_ratios, dtype=torch.float64)
    span = lod.max() - lod.min()
    scaled = (lod - lod.min()) / span * (2 * lamda) if span > 0 else torch.zeros_like(lod)
    density = scaled - scaled.mean() + (1 - target)
    sparsity = 1 - density
    if (sparsity < 0).any() or (sparsity >= 1).any():
        raise ConfigError(f"OWL ratios leave [0, 1) for target {target} and lambda {lamda}; lower owl_lambda")
    return sparsity.tolist()


def outlier_ratio(metrics: list[torch.Tensor], m: float) -> float:
    """Fraction of a block's Wanda scores above ``m`` times their mean (OWL's LOD)."""
    flat = torch.cat([x.flatten().float() for x in metrics])
    return float((flat > flat.mean() * m).sum()) / flat.numel()


class OutlierScan:
    """An engine visitor that measures each block's outlier ratio without pruning."""

    def __init__(self, m: float):
        self.m = m
        self.ratios: list[float] = []

    def required_stats(self) -> set[str]:
        return {"col_sq_norm"}

    def visit(self, index: int, block: nn.Module, linears: dict, stats: dict) -> bool:
        metrics = [wanda_metric(linear_weight_view(lin), stats[name]["col_sq_norm"]) for name, lin in linears.items()]
        self.ratios.append(outlier_ratio(metrics, self.m))
        return False


def block_ratios(
    config: AllocationConfig, n_blocks: int, target: float, outliers: list[float] | None = None
) -> list[float]:
    if config.method == "uniform":
        return [target] * n_blocks
    if config.method == "per_layer":
        bad = [k for k in config.ratios if not 0 <= k < n_blocks]
        if bad:
            raise ConfigError(f"allocation ratios name blocks {bad}, but the model has blocks 0..{n_blocks - 1}")
        return [config.ratios.get(i, target) for i in range(n_blocks)]
    if outliers is None:
        raise ConfigError("OWL allocation needs the outlier scan first")
    return owl_ratios(outliers, target, config.owl_lambda)
