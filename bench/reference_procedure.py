"""The Wanda paper code's pruning procedure, as that code runs it, as a speed and
exactness baseline (written here from its description, generic over decoder models).

What it does, like ``prune_wanda`` in the paper's repository:
- the whole model stays on one device;
- a Catcher module in place of block 0 records that block's input for each calibration
  sequence (one forward of the model per sequence, batch 1) into a preallocated tensor,
  and keeps the other arguments of the *last* call (attention mask, positions, rotary
  embeddings), which every block then reuses for every sequence;
- per block: forward hooks on every linear accumulate the running mean of ||x_j||^2
  (``WrappedGPT.add_batch``), one sequence at a time; masks are taken from
  |W| * sqrt(scaler) by a stable sort per row (unstructured) or a ``topk`` per group of
  M columns in a loop (N:M); masked weights are zeroed; then a *second* pass over the
  calibration sequences computes the block's outputs with the pruned weights, which
  become the next block's inputs.

Nothing here imports the product's engine, statistics or mask code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view


@dataclass
class ReferenceResult:
    masks: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    capture_seconds: float = 0.0
    seconds_per_block: list[float] = field(default_factory=list)


class _Stop(ValueError):
    pass


class _Catcher(nn.Module):
    def __init__(self, module: nn.Module, inps: torch.Tensor, cache: dict):
        super().__init__()
        self.module = module
        self.inps = inps
        self.cache = cache

    def forward(self, hidden_states, *args, **kwargs):
        self.inps[self.cache["i"]] = hidden_states[0]
        self.cache["i"] += 1
        self.cache["args"], self.cache["kwargs"] = args, kwargs
        raise _Stop

    def __getattr__(self, name: str):
        # Models may read attributes of their blocks (e.g. ``attention_type``) in the loop.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class _Wrapped:
    """``WrappedGPT``: the running mean of each input column's squared norm."""

    def __init__(self, columns: int, device: torch.device):
        self.scaler_row = torch.zeros(columns, device=device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def reference_mask(metric: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    mask = torch.zeros_like(metric) == 1
    if nm is not None:
        n, m = nm
        for ii in range(metric.shape[1]):
            if ii % m == 0:
                tmp = metric[:, ii : ii + m].float()
                mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    else:
        indices = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
        mask.scatter_(1, indices, True)
    return mask


def _block_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def reference_prune(model: nn.Module, tokens: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    device: str | torch.device = "cpu", keep_masks: bool = True) -> ReferenceResult:
    """Prune ``model`` in place with the paper code's procedure; masks keyed by (block, linear name)."""
    device = torch.device(device)
    result = ReferenceResult()
    start = time.perf_counter()
    model.to(device)
    _, layers = find_blocks(model)
    nsamples, seqlen = tokens.shape
    hidden = model.get_input_embeddings().weight.shape[1]
    dtype = next(iter(model.parameters())).dtype
    with torch.no_grad():
        inps = torch.zeros((nsamples, seqlen, hidden), dtype=dtype, device=device)
        cache = {"i": 0, "args": (), "kwargs": {}}
        layers[0] = _Catcher(layers[0], inps, cache)
        try:
            for j in range(nsamples):
                try:
                    model(tokens[j : j + 1].to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            layers[0] = layers[0].module
        outs = torch.zeros_like(inps)
        args, kwargs = cache["args"], cache["kwargs"]
    result.capture_seconds = time.perf_counter() - start

    for i in range(len(layers)):
        t0 = time.perf_counter()
        layer = layers[i]
        subset = find_linears(layer)
        wrapped = {name: _Wrapped(linear_weight_view(lin).shape[1], device) for name, lin in subset.items()}

        def add_batch(acc: _Wrapped):
            def tmp(_, inp, out):
                acc.add_batch(inp[0].data)

            return tmp

        handles = [subset[name].register_forward_hook(add_batch(acc)) for name, acc in wrapped.items()]
        for j in range(nsamples):
            with torch.no_grad():
                outs[j] = _block_out(layer(inps[j].unsqueeze(0), *args, **kwargs))[0]
        for h in handles:
            h.remove()
        for name in subset:
            weight = linear_weight_view(subset[name])
            metric = torch.abs(weight) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
            mask = reference_mask(metric, sparsity, nm)
            weight[mask] = 0
            if keep_masks:
                result.masks[(i, name)] = mask.cpu()
        for j in range(nsamples):
            with torch.no_grad():
                outs[j] = _block_out(layer(inps[j].unsqueeze(0), *args, **kwargs))[0]
        inps, outs = outs, inps
        result.seconds_per_block.append(time.perf_counter() - t0)
    result.seconds = time.perf_counter() - start
    return result
