"""Wanda++ (Yang et al. 2025, arXiv 2503.04992): Wanda's score plus a regional gradient, then
regional optimisation of each block against the dense block.

Score S = (alpha * G + ||X||_2) * |W|, compared per output row (or per group of M for N:M), as
Wanda. G is the regional gradient (:mod:`wanda_pipeline.regional.gradient`): |dL/dW| with
L = ||f(X_n)||_2 the norm of the block's output for one sample, aggregated over the samples.
After masking, the block's kept weights are optimised to match the dense block's outputs
(:mod:`wanda_pipeline.regional.optimise`), the mask re-applied at every step. The paper prunes
once more with RGS after that; with pruned weights exactly zero (score 0, the lowest) that
selects the same mask at the same sparsity, so it is not recomputed.

This is a block-level pruner: the engine hands it the whole block (``block_stats``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field

from wanda_pipeline.engine import BlockContext
from wanda_pipeline.plugins import PrunerConfig
from wanda_pipeline.regional.config import ReconstructConfig
from wanda_pipeline.regional.gradient import regional_gradients
from wanda_pipeline.sparsity import select_mask


class WandaPPConfig(PrunerConfig):
    alpha: float = Field(100.0, ge=0, description="weight of the regional gradient against ||X||_2")
    gradient: Literal["rms", "mean_abs"] = Field(
        "rms", description="how |dL/dW| is aggregated over samples: root mean square (as ||X||_2 is, and as the "
                           "public reproduction) or mean absolute value")
    gradient_samples: int | None = Field(
        8, gt=0, description="calibration samples the regional gradient is computed from (the first ones; "
                             "None: all, as the paper). Each costs a block forward and backward; 8 keeps Wanda++ "
                             "within 3x Wanda's prune time on 2 CPU cores (bench/results/reconstruct.md)")
    ro: ReconstructConfig = Field(default_factory=ReconstructConfig,
                                  description="regional optimisation; iterations 0: score only")


def rgs_metric(weight: torch.Tensor, col_sq_norm: torch.Tensor, gradient: torch.Tensor | None,
               alpha: float) -> torch.Tensor:
    """(alpha * G + ||X_j||_2) * |W_ij|; with no G, Wanda's |W| * ||X||."""
    x = torch.sqrt(col_sq_norm.reshape(1, -1).float())
    if gradient is not None:
        x = alpha * gradient.float() + x
    return weight.abs().float() * x


class WandaPPPruner:
    Config: ClassVar[type[WandaPPConfig]] = WandaPPConfig
    updates_weights: ClassVar[bool] = False  # prune() returns masks only; RO runs on the whole block
    comparison_group: ClassVar[str] = "output"

    def __init__(self, config: WandaPPConfig | None = None):
        self.config = config or WandaPPConfig()

    @property
    def reconstruct(self) -> ReconstructConfig:
        return self.config.ro

    def required_stats(self) -> set[str]:
        return {"col_sq_norm"}

    def block_stats(self, ctx: BlockContext) -> dict[str, dict[str, torch.Tensor]]:
        """The regional gradient of every linear, from the dense block."""
        grads = regional_gradients(ctx, self.config.gradient, self.config.gradient_samples)
        return {name: {"regional_grad": g} for name, g in grads.items()}

    def prune(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor], sparsity: float) -> torch.Tensor:
        metric = rgs_metric(weight, stats["col_sq_norm"], stats.get("regional_grad"), self.config.alpha)
        return select_mask(metric, sparsity, self.config.pattern, "output")
