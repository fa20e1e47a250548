"""What a block-level visitor gets: the whole block, not only per-linear statistics.

A visitor with a ``visit_block(ctx) -> bool`` method is called instead of ``visit`` after the
engine's observe forward, with a :class:`BlockContext`. It may run the block forward again,
with gradients if it wants them (regional gradients, local reconstruction), through
:meth:`BlockContext.forward`, which calls the block exactly as every other engine forward does
(each batch's own captured arguments, the same device moves). Nothing here outlives the block:
the context holds references to tensors the loop holds anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from wanda_pipeline.errors import ConfigError


@dataclass
class BlockContext:
    index: int
    block: nn.Module  # on the execution device
    linears: dict[str, nn.Module]  # the block's prunable linears after include/exclude
    stats: dict[str, dict[str, torch.Tensor]]  # per linear, what the visitor's required_stats asked for
    inputs: list[torch.Tensor]  # per calibration batch, on the store device (CPU when offloading)
    calls: list[tuple[tuple, dict]]  # per batch: the block's other positional args and kwargs
    dense: list[torch.Tensor]  # per batch: the dense block's outputs, from the observe forward
    device: torch.device
    store_device: torch.device
    run_batch: Callable[[nn.Module, torch.Tensor, tuple[tuple, dict], dict], torch.Tensor]
    _memo: dict = field(default_factory=dict, repr=False)  # device copies of the batch arguments, moved once

    @property
    def batches(self) -> int:
        return len(self.inputs)

    def forward(self, batch: int, hidden: torch.Tensor | None = None, grad: bool = False) -> torch.Tensor:
        """Block output for calibration batch ``batch`` (default input: that batch's), on the
        device. With ``grad`` autograd records the forward; otherwise it runs under no_grad."""
        hidden = self.inputs[batch] if hidden is None else hidden
        with torch.set_grad_enabled(grad):
            return self.run_batch(self.block, hidden, self.calls[batch], self._memo)

    def outputs(self) -> list[torch.Tensor]:
        """The block's current outputs for every batch, detached, on the store device."""
        return [self.forward(b).detach().to(self.store_device) for b in range(self.batches)]

    @contextmanager
    def trainable(self, params: Iterable[torch.Tensor]) -> Iterator[None]:
        """Inside, autograd tracks exactly ``params`` among the block's parameters (models load
        with every parameter trainable, streamed blocks with none); the flags are put back after."""
        wanted = {id(p) for p in params}
        before = [(p, p.requires_grad) for p in self.block.parameters()]
        try:
            for p, _ in before:
                p.requires_grad_(id(p) in wanted)
            yield
        finally:
            for p, flag in before:
                p.requires_grad_(flag)
                p.grad = None



def is_block_level(visitor: object) -> bool:
    return hasattr(visitor, "visit_block")


def check_passes(visitor: object, passes: int) -> None:
    if is_block_level(visitor) and passes == 1:
        raise ConfigError(f"{type(visitor).__name__} works on whole blocks (it runs the block forward again, for "
                          "gradients or reconstruction), which passes=1 cannot do; use passes: 2")
