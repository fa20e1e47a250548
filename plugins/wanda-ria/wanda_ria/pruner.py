"""RIA: relative importance and activations (Zhang et al. 2024)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field

from wanda_pipeline.plugins import PrunerConfig
from wanda_pipeline.sparsity import select_mask


def ria_metric(weight: torch.Tensor, col_sq_norm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    w = weight.abs().float()
    relative = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12) + w / w.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return relative * col_sq_norm.float().sqrt().reshape(1, -1) ** a


class RIAConfig(PrunerConfig):
    a: float = Field(0.5, ge=0, description="exponent on the activation norm")
    group: Literal["output", "layer"] = "output"


class RIAPruner:
    Config: ClassVar[type[RIAConfig]] = RIAConfig
    updates_weights: ClassVar[bool] = False

    def __init__(self, config: RIAConfig | None = None):
        self.config = config or RIAConfig()

    def required_stats(self) -> set[str]:
        return {"col_sq_norm"}

    def prune(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor], sparsity: float) -> torch.Tensor:
        metric = ria_metric(weight, stats["col_sq_norm"], self.config.a)
        return select_mask(metric, sparsity, self.config.pattern, self.config.group)
