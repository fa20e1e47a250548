"""Wanda (Sun et al. 2023): prune by |W| * ||X||_2, per output row, no weight update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import model_validator

from wanda_pipeline.plugins import PrunerConfig
from wanda_pipeline.sparsity import nm_mask, parse_pattern, select_mask, variant_mask, wanda_metric


class WandaConfig(PrunerConfig):
    group: Literal["output", "layer"] = "output"
    use_variant: bool = False
    variant_tol: float = 0.001

    @model_validator(mode="after")
    def _variant_unstructured(self):
        if self.use_variant and self.pattern != "unstructured":
            raise ValueError("use_variant works only with pattern 'unstructured'")
        return self


class WandaPruner:
    Config: ClassVar[type[WandaConfig]] = WandaConfig
    updates_weights: ClassVar[bool] = False

    def __init__(self, config: WandaConfig | None = None):
        self.config = config or WandaConfig()

    def required_stats(self) -> set[str]:
        return {"col_sq_norm"}

    def prune(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor], sparsity: float) -> torch.Tensor:
        metric = wanda_metric(weight, stats["col_sq_norm"])
        nm = parse_pattern(self.config.pattern)
        if nm is not None:
            return nm_mask(metric, *nm)
        if self.config.use_variant:
            mask, _, _ = variant_mask(metric, sparsity, self.config.variant_tol)
            return mask
        return select_mask(metric, sparsity, "unstructured", self.config.group)
