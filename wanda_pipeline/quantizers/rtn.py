"""Round-to-nearest weight-only quantisation, grouped along the input dimension.

The convention is compressed-tensors' (and so vLLM's): integer codes ``q`` in the signed
range ``[-2**(bits-1), 2**(bits-1) - 1]``, per-group ``scale`` (stored in the weight's
dtype) and, when asymmetric, an integer zero point ``zp`` in the same range, with

    weight = (q - zp) * scale          # computed in the scale's dtype, as compressed-tensors does

A pruned zero stays exactly zero: symmetric codes it as 0; asymmetric ranges are widened
to include 0, so ``zp`` is a valid code and ``0 / scale + zp`` rounds to ``zp``, which
dequantises to ``(zp - zp) * scale = 0``. The quantize stage checks it.

``quantize_weight`` returns the dequantised weight (what the model computes with) and
remembers each result's scales and zero points, keyed by the result's bytes, so an
exporter can later recover the exact codes with :meth:`RTNQuantizer.codes_for`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from wanda_pipeline.plugins import PluginConfig


class RTNConfig(PluginConfig):
    bits: Literal[4, 8] = 8
    group_size: int = Field(128, gt=0, description="columns per scale; -1 style per-row is group_size >= in_features")
    symmetric: bool = True
    scale_bits: int = Field(16, description="bits to store each scale (and zero point) in, for the size report")


@dataclass
class RTNCodes:
    """One weight's quantisation: codes (int8, weight's shape), scale and zero point
    (rows, groups), and the group size along the input dimension."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group_size: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        cols = self.codes.shape[1]
        scale = self.scale.repeat_interleave(self.group_size, dim=1)[:, :cols]
        q = self.codes.to(scale.dtype)
        if self.zero_point is not None:
            q = q - self.zero_point.repeat_interleave(self.group_size, dim=1)[:, :cols].to(scale.dtype)
        return q * scale


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize_codes(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                   scale_dtype: torch.dtype | None = None) -> RTNCodes:
    """Codes, scales and zero points of ``weight`` (out, in) in groups of ``group_size`` columns
    (the last group is zero-padded when ``group_size`` does not divide ``in``). Scales are
    stored in ``scale_dtype`` (default: the weight's; gptq passes float32 values of a bf16 model)."""
    rows, cols = weight.shape
    dtype = scale_dtype or weight.dtype
    w = weight.detach().float()
    pad = (-cols) % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    g = w.reshape(rows, -1, group_size)
    qmin, qmax = qrange(bits)
    if symmetric:
        scale = g.abs().amax(dim=-1) / qmax
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
    # The scale is stored in the weight's dtype; quantise with the stored value.
    scale = scale.to(dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    s32 = scale.float().unsqueeze(-1)
    if symmetric:
        zero = None
        q = torch.round(torch.clamp(g / s32, qmin, qmax))
    else:
        zero = torch.clamp(torch.round(qmin - lo / scale.float()), qmin, qmax)
        q = torch.round(torch.clamp(g / s32 + zero.unsqueeze(-1), qmin, qmax))
        zero = zero.to(torch.int8)
    codes = q.reshape(rows, -1)[:, :cols].to(torch.int8)
    return RTNCodes(codes=codes, scale=scale, zero_point=zero, group_size=group_size, bits=bits)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Quantise-dequantise ``weight`` (out, in) in groups of ``group_size`` input columns."""
    return quantize_codes(weight, bits, group_size, symmetric).dequantize().to(weight.dtype)


def weight_digest(weight: torch.Tensor) -> str:
    t = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def recover_codes(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int,
                  bits: int) -> RTNCodes | None:
    """The codes that dequantise to ``weight`` bitwise under ``scale`` / ``zero_point``, or None.

    Rounding ``weight / scale + zp`` finds the code, except where a low-precision dtype
    (bf16) maps neighbouring codes to one value; then any neighbour that reproduces the
    value bitwise is as good, and the nearest three are tried."""
    rows, cols = weight.shape
    qmin, qmax = qrange(bits)
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :cols]
    z = zero_point.float().repeat_interleave(group_size, dim=1)[:, :cols] if zero_point is not None else 0.0
    guess = torch.round(weight.float() / s + z)
    best = None
    for delta in (0, -1, 1):
        codes = RTNCodes(torch.clamp(guess + delta, qmin, qmax).to(torch.int8), scale, zero_point, group_size, bits)
        ok = codes.dequantize().to(weight.dtype) == weight
        if best is None:
            best, good = codes, ok
        else:
            best.codes = torch.where(good, best.codes, codes.codes)
            good = good | ok
    return best if bool(good.all()) else None


class GroupedIntQuantizer:
    """What every grouped-integer quantizer shares: the config fields ``bits``, ``group_size``,
    ``symmetric``, ``scale_bits``; the record of each result's scales and zero points (so an
    exporter recovers the exact codes); the size report."""

    config: RTNConfig

    def __init__(self, config):
        self.config = config
        self._params: dict[str, tuple[torch.Tensor, torch.Tensor | None, int]] = {}

    def group_size_for(self, in_features: int) -> int:
        return min(self.config.group_size, in_features)

    def remember(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Record that ``weight`` (dequantised) has these per-group scales and zero points."""
        zero_point = zero_point.detach().cpu() if zero_point is not None else None  # exporters work on the CPU
        self._params[weight_digest(weight)] = (scale.detach().cpu(), zero_point, self.group_size_for(weight.shape[1]))

    def params_for(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(scale, zero point) recorded for this exact weight, or None."""
        params = self._params.get(weight_digest(weight))
        return None if params is None else params[:2]

    def codes_for(self, weight: torch.Tensor) -> RTNCodes | None:
        """Codes, scales and zero points of a weight this quantizer produced, exact to the bit;
        None if it did not produce this weight (not quantised, or changed since)."""
        params = self._params.get(weight_digest(weight))
        if params is None:
            return None
        scale, zero, group = params
        return recover_codes(weight.detach().cpu(), scale, zero, group, self.config.bits)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        c = self.config
        group = min(c.group_size, shape[1])
        per_group = c.scale_bits * (1 if c.symmetric else 2)
        return c.bits + per_group / group


class RTNQuantizer(GroupedIntQuantizer):
    Config: ClassVar[type[RTNConfig]] = RTNConfig

    def __init__(self, config: RTNConfig | None = None):
        super().__init__(config or RTNConfig())

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        c = self.config
        qc = quantize_codes(weight, c.bits, self.group_size_for(weight.shape[1]), c.symmetric)
        out = qc.dequantize().to(weight.dtype)
        self.remember(out, qc.scale, qc.zero_point)
        return out
