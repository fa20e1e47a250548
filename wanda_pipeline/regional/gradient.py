"""Regional gradients (Wanda++): how much each weight moves the norm of its block's output.

For every calibration sample n, L_n = ||f(X_n)||_2 is the L2 norm of the block's output for
that sample alone, and one backward through the block gives dL_n/dW for every linear. G
aggregates |dL_n/dW| over the samples, by default as the root mean square. A batch of several
samples is run forward once and backpropagated once per sample (blocks never mix samples), so
G does not depend on the batch size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from wanda_pipeline.engine import BlockContext


def as_weight_view(linear: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``linear.weight`` seen as (out_features, in_features): the same rule
    as :func:`wanda_pipeline.models.linear_weight_view` (GPT-2's Conv1D stores it transposed)."""
    return tensor.t() if type(linear).__name__ == "Conv1D" else tensor


def regional_gradients(ctx: BlockContext, aggregation: Literal["rms", "mean_abs"] = "rms",
                       limit: int | None = None) -> dict[str, torch.Tensor]:
    """G per linear of ``ctx.linears``, float32, (out_features, in_features), on the device,
    computed on the block as it is now (the engine calls it on the dense block), from the first
    ``limit`` calibration samples (None: all of them)."""
    names = list(ctx.linears)
    if not names:  # include/exclude left nothing in this block
        return {}
    params = [ctx.linears[n].weight for n in names]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    samples = 0
    with ctx.trainable(params):
        for b in range(ctx.batches):
            if limit is not None and samples >= limit:
                break
            out = ctx.forward(b, grad=True)
            take = out.shape[0] if limit is None else min(out.shape[0], limit - samples)
            for s in range(take):
                loss = out[s].float().norm()
                grads = torch.autograd.grad(loss, params, retain_graph=s < take - 1, allow_unused=True)
                for a, g in zip(acc, grads, strict=True):
                    if g is not None:  # a linear the forward never used has no gradient
                        g = g.float()
                        a.add_(g * g if aggregation == "rms" else g.abs())
                samples += 1
            del out
    result = {}
    for name, a in zip(names, acc, strict=True):
        a /= max(samples, 1)
        result[name] = as_weight_view(ctx.linears[name], a.sqrt_() if aggregation == "rms" else a)
    return result
