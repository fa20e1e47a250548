"""Round-to-nearest weight-only quantisation (simulated: weights are quantised and
dequantised in place), grouped along the input dimension.

Zero stays exactly zero: the symmetric grid contains 0, and the asymmetric range is
widened to include 0 so its zero point maps back to 0. The quantize stage checks it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from wanda_pipeline.plugins import PluginConfig


class RTNConfig(PluginConfig):
    bits: Literal[4, 8] = 8
    group_size: int = Field(128, gt=0, description="columns per scale; -1 style per-row is group_size >= in_features")
    symmetric: bool = True
    scale_bits: int = Field(16, description="bits to store each scale (and zero point) in, for the size report")


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Quantise-dequantise ``weight`` (out, in) in groups of ``group_size`` input columns."""
    rows, cols = weight.shape
    w = weight.detach().float()
    pad = (-cols) % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    g = w.reshape(rows, -1, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = g.abs().amax(dim=-1, keepdim=True) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        deq = torch.clamp(torch.round(g / scale), -qmax - 1, qmax) * scale
    else:
        qmax = 2**bits - 1
        lo = g.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = g.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale)
        deq = (torch.clamp(torch.round(g / scale) + zero, 0, qmax) - zero) * scale
    return deq.reshape(rows, -1)[:, :cols].to(weight.dtype)


class RTNQuantizer:
    Config: ClassVar[type[RTNConfig]] = RTNConfig

    def __init__(self, config: RTNConfig | None = None):
        self.config = config or RTNConfig()

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        c = self.config
        return quantize_rtn(weight, c.bits, min(c.group_size, weight.shape[1]), c.symmetric)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        c = self.config
        group = min(c.group_size, shape[1])
        per_group = c.scale_bits * (1 if c.symmetric else 2)
        return c.bits + per_group / group
