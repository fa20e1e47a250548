"""Magnitude pruning: the baseline, per layer (as in the reference) or per output row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch

from wanda_pipeline.plugins import PrunerConfig
from wanda_pipeline.sparsity import select_mask


class MagnitudeConfig(PrunerConfig):
    group: Literal["layer", "output"] = "layer"


class MagnitudePruner:
    Config: ClassVar[type[MagnitudeConfig]] = MagnitudeConfig
    updates_weights: ClassVar[bool] = False

    def __init__(self, config: MagnitudeConfig | None = None):
        self.config = config or MagnitudeConfig()

    def required_stats(self) -> set[str]:
        return set()

    def prune(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor], sparsity: float) -> torch.Tensor:
        return select_mask(weight.abs(), sparsity, self.config.pattern, self.config.group)
