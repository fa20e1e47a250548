"""Record every decoder block's own inputs in one cheap forward.

Each block is swapped for a recorder that stores its positional and keyword arguments and
returns its input unchanged, so one forward costs the embeddings alone and every block gets
exactly what the model would pass it: its own attention mask (sliding or full), rotary
table, cache positions. No architecture is named. Equal tensors are stored once, so layers
of one type share one mask object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wanda_pipeline.errors import ConfigError

_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


class _Stop(Exception):
    """Raised by the last recorder: nothing after the blocks needs to run."""


class TensorStore:
    """Interns tensors by value: equal tensors (same shape, dtype, contents) are kept once."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buckets: dict[tuple, list[torch.Tensor]] = {}

    def intern(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        bucket = self._buckets.setdefault((tuple(t.shape), t.dtype), [])
        for kept in bucket:
            if kept is t or torch.equal(kept, t.to(kept.device)):
                return kept
        kept = t.to(self.device)
        bucket.append(kept)
        return kept

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())


@dataclass
class Captured:
    """Block 0's hidden states per batch, and for every block and batch the other arguments."""

    inputs: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]  # [block][batch] -> (extra positional args, kwargs)
    store: TensorStore
    output_mode: str = "tensor"
    distinct: int = field(default=0)

    def block_calls(self, index: int) -> list[tuple[tuple, dict]]:
        return self.calls[index]


def _freeze(obj: Any, store: TensorStore, arch: str, where: str) -> Any:
    """Intern tensors inside an argument; refuse objects the engine cannot replay."""
    if isinstance(obj, torch.Tensor):
        return store.intern(obj)
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_freeze(o, store, arch, where) for o in obj)
    if isinstance(obj, dict):
        return {k: _freeze(v, store, arch, where) for k, v in obj.items()}
    raise ConfigError(
        f"{arch}: the model passes its decoder blocks {where} of type {type(obj).__name__} (a cache or other "
        "cross-layer state), which the layer engine cannot replay block by block; this architecture is not "
        "supported by the layer engine"
    )


class _Recorder(nn.Module):
    def __init__(self, index: int, inner: nn.Module, log: list, last: bool, mode: str,
                 final: torch.Tensor | None = None):
        super().__init__()
        self.index, self.inner, self.log, self.last, self.mode = index, inner, log, last, mode
        self.final = final

    def __getattr__(self, name: str):
        # Models may read attributes of their layers in the loop (e.g. an attention type).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.log.append((self.index, hidden, rest, kwargs))
        if self.last and self.final is not None:
            hidden = self.final.to(hidden.device)
        elif self.last:
            raise _Stop
        return (hidden,) if self.mode == "tuple" else hidden


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return f"{type(model).__name__} ({getattr(cfg, 'model_type', '?')})"


def _record_batch(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, mode: str,
                  final: torch.Tensor | None = None) -> tuple[list, Any]:
    log: list = []
    out = None
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(i, block, log, last=i == len(originals) - 1, mode=mode, final=final)
    try:
        with torch.no_grad():
            out = model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return log, out


def run_tail(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, final: torch.Tensor, mode: str) -> Any:
    """The model's output when its last block returns ``final``: whatever follows the blocks
    (final norm, head) applied to hidden states computed elsewhere, block by block."""
    return _record_batch(model, blocks, batch, mode, final)[1]


def _consistent(log: list, n_blocks: int) -> bool:
    """Every block was called once, in order, on exactly what the block before returned."""
    if [entry[0] for entry in log] != list(range(n_blocks)):
        return False
    return all(log[i][1] is log[0][1] for i in range(1, n_blocks))


def capture(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
            store_device: torch.device, input_device: torch.device) -> Captured:
    """Record every block's arguments for every batch of ``tokens``."""
    arch = _arch(model)
    store = TensorStore(store_device)
    inputs: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    mode = "tensor"
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(input_device)
        log, _ = _record_batch(model, blocks, batch, mode)
        if not _consistent(log, len(blocks)) and start == 0:
            mode = "tuple"  # older blocks return (hidden, ...) and the model takes [0]
            log, _ = _record_batch(model, blocks, batch, mode)
        if not _consistent(log, len(blocks)):
            raise ConfigError(
                f"{arch}: its forward does not pass each decoder block the previous block's output unchanged "
                "(it transforms or mixes hidden states between blocks, or skips blocks), so the layer engine "
                "cannot run it block by block; this architecture is not supported by the layer engine"
            )
        inputs.append(log[0][1].detach().to(store_device))
        for index, _hidden, rest, kwargs in log:
            where = f"block {index} arguments"
            calls[index].append((_freeze(rest, store, arch, where), _freeze(kwargs, store, arch, where)))
    return Captured(inputs=inputs, calls=calls, store=store, output_mode=mode, distinct=len(store))
