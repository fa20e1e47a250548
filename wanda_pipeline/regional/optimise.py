"""Regional optimisation: after masking, fit the block's kept weights to the dense block's
outputs (Wanda++'s RO; block-local reconstruction for any mask).

Each iteration draws ``samples`` calibration samples (whole batches, in a seeded order) and
takes one optimiser step per batch on the summed squared error between the block's output and
the dense block's output for that batch. Updates run on float32 master copies of the weights,
also for bf16/fp16 blocks, and the gradient and the weights are masked at every step, so a
pruned weight stays exactly zero. Only the linears in ``masks`` are trained.
"""

from __future__ import annotations

import math

import torch

from wanda_pipeline.engine import BlockContext
from wanda_pipeline.regional.config import ReconstructConfig
from wanda_pipeline.regional.gradient import as_weight_view

OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def draw(batches: int, batch_size: int, config: ReconstructConfig, index: int, iteration: int) -> list[int]:
    """The batches of one iteration: enough to hold ``config.samples`` samples, in an order
    fixed by the seed, the block and the iteration (so a resumed run draws the same)."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + index * 1_009 + iteration)
    take = min(batches, max(1, math.ceil(config.samples / max(batch_size, 1))))
    return torch.randperm(batches, generator=g)[:take].tolist()


def block_error(ctx: BlockContext) -> float:
    """Sum of squared differences between the block's outputs now and the dense outputs."""
    total = 0.0
    for b in range(ctx.batches):
        out = ctx.forward(b).float()
        total += float(((out - ctx.dense[b].to(out.device).float()) ** 2).sum())
    return total


def optimise(ctx: BlockContext, masks: dict[str, torch.Tensor], config: ReconstructConfig) -> int:
    """Run regional optimisation on ``ctx.block`` in place; returns the number of steps taken.
    ``masks``: per linear name, bool (out_features, in_features), True = pruned."""
    names = [n for n in masks if n in ctx.linears]
    if config.iterations == 0 or not names or not ctx.batches:
        return 0
    params = [ctx.linears[n].weight for n in names]
    # masks in each parameter's own layout (Conv1D stores the weight transposed)
    pruned = [as_weight_view(ctx.linears[n], masks[n].to(p.device)) for n, p in zip(names, params, strict=True)]
    masters = [p.detach().float().clone().masked_fill_(m, 0) for p, m in zip(params, pruned, strict=True)]
    opt = OPTIMIZERS[config.optimizer](masters, lr=config.lr)
    steps = 0
    with ctx.trainable(params):
        for it in range(config.iterations):
            for b in draw(ctx.batches, ctx.inputs[0].shape[0], config, ctx.index, it):
                out = ctx.forward(b, grad=True)
                loss = ((out.float() - ctx.dense[b].to(out.device).float()) ** 2).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                del out, loss
                for master, g, m in zip(masters, grads, pruned, strict=True):
                    master.grad = torch.zeros_like(master) if g is None else g.float().masked_fill_(m, 0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for p, master, m in zip(params, masters, pruned, strict=True):
                        p.copy_(master.masked_fill_(m, 0))  # re-apply the mask: pruned weights stay 0
                steps += 1
    return steps
