"""What a resumed run saves per finished block and how it puts those blocks back.

A visitor that supports resuming has ``block_state(index, linears) -> dict`` and
``restore_state(index, linears, state)``; otherwise the linears' weights are saved and
copied back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wanda_pipeline.engine.checkpoint import Checkpoint
from wanda_pipeline.engine.sink import BlockSink
from wanda_pipeline.engine.source import BlockSource
from wanda_pipeline.models import find_linears, linear_weight_view


def block_state(visitor: Any, index: int, linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The tensors that make block ``index`` finished: the visitor's own, else the weights."""
    getter = getattr(visitor, "block_state", None)
    if getter is not None:
        return getter(index, linears)
    return {f"{name}.weight": linear_weight_view(lin) for name, lin in linears.items()}


def restore_finished(source: BlockSource, sink: BlockSink, visitor: Any, checkpoint: Checkpoint, start: int,
                     device: torch.device, include: str | None, exclude: str | None) -> None:
    """Put blocks ``0..start-1``'s saved state back (into the model, or out to the sink)."""
    restore = getattr(visitor, "restore_state", None)
    for index in range(start):
        block = source.load(index, device)
        linears = find_linears(block, include, exclude)
        state = checkpoint.block_state(index)
        if restore is not None:
            restore(index, linears, state)
        else:
            _restore_weights(linears, state)
        sink.put(index, block)


def _restore_weights(linears: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, lin in linears.items():
            weight = linear_weight_view(lin)
            weight.copy_(state[f"{name}.weight"].to(weight.device, weight.dtype))
