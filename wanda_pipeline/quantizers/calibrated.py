"""Calibrated quantizers inside the block loop: an engine visitor that runs the prune visitor,
then quantizes each linear it just pruned with the statistics of the same observe pass.

A quantizer is *calibrated* when it declares statistics (``required_stats()``, as pruners do;
gptq asks for ``gram``). The engine then collects the union of both plugins' statistics once
per block, so the quantizer sees exactly the inputs the pruner saw, and the block outputs it
recomputes (the next block's inputs) are those of the pruned *and* quantized block. With
``passes=1`` the engine visits linear by linear in a pre-hook, so each linear is pruned,
quantized, and only then computes. Calibration-free quantizers (rtn) still run after pruning,
in the quantize stage.

Resuming: a finished block's state is its quantized weights with their scales and zero points
(and its count of pruned zeros, for the report); restoring it re-registers the codes with the
quantizer, so a resumed run exports like an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wanda_pipeline.errors import PluginError, RunError
from wanda_pipeline.models import linear_weight_view


def calibrated_stats(quantizer: Any) -> set[str]:
    """The statistics a quantizer declares; empty for calibration-free ones (and for None)."""
    required = getattr(quantizer, "required_stats", None)
    return set(required()) if required is not None else set()


@dataclass
class QuantTally:
    """What the quantize report needs, summed over the linears quantized so far."""

    linears: int = 0
    numel: int = 0
    bits: float = 0.0
    zeros_before: int = 0
    zeros_after: int = 0
    seconds: float = 0.0

    def add(self, weight: torch.Tensor, zeros_before: int, bits_per_weight: float) -> None:
        self.linears += 1
        self.numel += weight.numel()
        self.bits += bits_per_weight * weight.numel()
        self.zeros_before += zeros_before
        self.zeros_after += int((weight == 0).sum())


def quantize_linear(quantizer: Any, weight: torch.Tensor, stats: dict[str, torch.Tensor] | None, where: str,
                    tally: QuantTally) -> int:
    """Quantize ``weight`` in place (with ``stats`` for a calibrated quantizer), fail if a zero
    moved, and count it in ``tally``. Returns the number of zeros before (the pruned weights)."""
    t0 = time.perf_counter()
    zero = weight == 0
    args = (weight.detach().clone(),) if stats is None else (weight.detach().clone(), stats)
    try:
        new = quantizer.quantize_weight(*args)
    except Exception as exc:
        raise PluginError(f"quantizer {type(quantizer).__name__} crashed on {where}: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(new, torch.Tensor) or new.shape != weight.shape:
        raise PluginError(f"quantizer {type(quantizer).__name__} changed the shape of {where}")
    moved = int((new[zero] != 0).sum())
    if moved:
        raise RunError(f"quantizer {type(quantizer).__name__} turned {moved} pruned zeros of {where} non-zero; "
                       f"a quantizer must keep the sparsity mask")
    with torch.no_grad():
        weight.copy_(new)
    zeros = int(zero.sum())
    tally.seconds += time.perf_counter() - t0
    tally.add(weight, zeros, quantizer.bits_per_weight(tuple(weight.shape)))
    return zeros


class CalibratedQuantize:
    """Visitor: ``inner`` (the prune visitor) on each linear, then ``quantizer`` on it."""

    def __init__(self, inner: Any, quantizer: Any):
        self.inner, self.quantizer = inner, quantizer
        self.one_pass = getattr(inner, "one_pass", False)
        self.tally = QuantTally()
        self._state: tuple[int, dict[str, torch.Tensor]] | None = None
        if hasattr(inner, "visit_block"):  # a block-level pruner (wanda++, reconstruct): the engine must see it
            self.visit_block = self._visit_block

    def _visit_block(self, ctx: Any) -> bool:
        """The inner visitor's whole-block pass (masks, then any optimisation), then quantize each
        linear on the statistics of the same observe forward."""
        self.inner.visit_block(ctx)
        self._quantize(ctx.index, ctx.linears, ctx.stats)
        return True

    def required_stats(self) -> set[str]:
        return set(self.inner.required_stats()) | calibrated_stats(self.quantizer)

    def visit(self, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: dict) -> bool:
        self.inner.visit(index, block, linears, stats)
        self._quantize(index, linears, stats)
        return True

    def _quantize(self, index: int, linears: dict[str, nn.Module], stats: dict) -> None:
        # passes=1 visits one linear at a time: keep adding to this block's state
        state = self._state[1] if self._state is not None and self._state[0] == index else {}
        for name, lin in linears.items():
            weight = linear_weight_view(lin)
            zeros = quantize_linear(self.quantizer, weight, stats.get(name, {}), f"block {index} {name!r}", self.tally)
            state[f"{name}.weight"] = weight.detach().to("cpu", copy=True)
            state[f"{name}.pruned_zeros"] = torch.tensor([zeros], dtype=torch.int64)
            params_for = getattr(self.quantizer, "params_for", None)  # quantizers that keep codes (for export)
            found = params_for(weight) if params_for is not None else None
            if found is not None:
                state[f"{name}.weight_scale"] = found[0].detach().to("cpu")
                if found[1] is not None:
                    state[f"{name}.weight_zero_point"] = found[1].detach().to("cpu")
        self._state = (index, state)

    def block_state(self, index: int, linears: dict) -> dict[str, torch.Tensor]:
        if self._state is None or self._state[0] != index:
            raise RuntimeError(f"no quantized state for block {index}")
        return self._state[1]

    def restore_state(self, index: int, linears: dict, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, lin in linears.items():
                weight = linear_weight_view(lin)
                weight.copy_(state[f"{name}.weight"].to(weight.device, weight.dtype))
                if f"{name}.weight_scale" in state:
                    self.quantizer.remember(weight, state[f"{name}.weight_scale"],
                                            state.get(f"{name}.weight_zero_point"))
                self.tally.add(weight, int(state[f"{name}.pruned_zeros"]),
                               self.quantizer.bits_per_weight(tuple(weight.shape)))
