"""One calibration forward per block (``passes=1``).

All calibration sequences go through the block as one batch. A forward-pre-hook on every
linear receives that linear's complete input, accumulates its statistics, asks the visitor to
prune it and only then lets it compute. So later linears of a block see the already pruned
earlier ones (true-sequential), and the block output of this same forward is the pruned
block's output: no second forward. Memory grows with the whole calibration batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wanda_pipeline.errors import ConfigError
from wanda_pipeline.models import linear_weight_view
from wanda_pipeline.stats import make_accumulators


def _merge(values: list[Any], sizes: list[int], where: str) -> Any:
    """One argument for the whole batch from its per-call values (one per recorded batch)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        same = all(v is first for v in values)
        if same and (first.dim() == 0 or first.shape[0] == 1):
            return first  # broadcasts over any batch (rotary tables, position ids, shared masks)
        pairs = zip(values, sizes, strict=True)
        if all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for v, n in pairs):
            return torch.cat(values, dim=0)  # per-sample (padding masks, per-row positions)
        raise ConfigError(
            f"passes=1: block argument {where} has shapes {[tuple(v.shape) for v in values]} that are neither "
            "shared nor batched along dim 0, so the calibration batches cannot be joined into one forward; "
            "use passes: 2"
        )
    if isinstance(first, (tuple, list)):
        if any(not isinstance(v, type(first)) or len(v) != len(first) for v in values):
            raise ConfigError(f"passes=1: block argument {where} differs in structure between batches; use passes: 2")
        return type(first)(_merge([v[i] for v in values], sizes, f"{where}[{i}]") for i in range(len(first)))
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise ConfigError(f"passes=1: block argument {where} differs in keys between batches; use passes: 2")
        return {k: _merge([v[k] for v in values], sizes, f"{where}.{k}") for k in first}
    if any(v != first for v in values):
        raise ConfigError(f"passes=1: block argument {where} differs between batches ({values[:3]}); use passes: 2")
    return first


def join_calls(inputs: list[torch.Tensor], calls: list[tuple[tuple, dict]]) -> tuple[torch.Tensor, tuple, dict]:
    """The hidden states and arguments of one forward over all recorded batches."""
    sizes = [h.shape[0] for h in inputs]
    if len(inputs) == 1:
        return inputs[0], calls[0][0], calls[0][1]
    rest = _merge([c[0] for c in calls], sizes, "args")
    kwargs = _merge([c[1] for c in calls], sizes, "kwargs")
    return torch.cat(inputs, dim=0), rest, kwargs


class OnePass:
    """Pre-hooks that prune each linear, once, right before its first call in the forward."""

    def __init__(self, visitor, index: int, block: nn.Module, linears: dict[str, nn.Module], needed: set[str],
                 device: torch.device, samples: int):
        self.visitor, self.index, self.block, self.linears = visitor, index, block, linears
        self.needed, self.device, self.samples = needed, device, samples
        self.done: set[str] = set()
        self._last: tuple[torch.Tensor, dict] | None = None  # q/k/v share one input: accumulate once

    def _stats(self, name: str, x: torch.Tensor | None, samples: int | None = None) -> dict[str, torch.Tensor]:
        in_features = linear_weight_view(self.linears[name]).shape[1]
        if x is not None and self._last is not None and self._last[0] is x:
            accs = self._last[1]
            if all(a.value.shape[0] == in_features for a in accs.values()):
                return {k: a.value for k, a in accs.items()}
        accs = make_accumulators(self.needed, in_features, self.device)
        if x is not None:
            for acc in accs.values():
                acc.update(x, samples)
            self._last = (x, accs)
        return {k: a.value for k, a in accs.items()}

    def prune(self, name: str, x: torch.Tensor | None, samples: int | None = None) -> None:
        if name in self.done:
            return  # a linear called twice in one forward is pruned on its first input only
        self.done.add(name)
        self.visitor.visit(self.index, self.block, {name: self.linears[name]}, {name: self._stats(name, x, samples)})

    def hook(self, name: str):
        def pre(_module, args):
            self.prune(name, args[0], self.samples)  # the same object for q/k/v: accumulated once

        return pre

    def run(self, forward) -> Any:
        handles = [lin.register_forward_pre_hook(self.hook(name)) for name, lin in self.linears.items()]
        try:
            out = forward()
        finally:
            for h in handles:
                h.remove()
        self._last = None
        for name in self.linears:  # never called in the forward: statistics of no input, as with passes=2
            self.prune(name, None)
        return out
