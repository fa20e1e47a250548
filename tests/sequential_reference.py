"""A deliberately slow, independent reference for the layer engine: everything is observed
through whole-model forwards, one calibration sample at a time, with no block-level replay.

For block i, the statistics of its linears come from forwards of the whole model in which
blocks 0..i-1 are already pruned, exactly what "prune block by block" means.
"""

from __future__ import annotations

import torch

from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view


def observe_block(model, tokens: torch.Tensor, index: int, include=None, exclude=None) -> dict[str, torch.Tensor]:
    """Column squared norms of block ``index``'s linear inputs, as the reference
    ``WrappedGPT.add_batch`` keeps them (running mean over samples), from whole-model forwards."""
    _, blocks = find_blocks(model)
    found, hooks = {}, []
    for name, lin in find_linears(blocks[index], include, exclude).items():
        state = {"value": torch.zeros(linear_weight_view(lin).shape[1]), "n": 0}
        found[name] = state

        def hook(_m, args, _out, state=state):
            x = args[0].reshape(-1, args[0].shape[-1]).t().float()
            state["value"] *= state["n"] / (state["n"] + 1)
            state["n"] += 1
            state["value"] += torch.norm(x, p=2, dim=1) ** 2 / state["n"]

        hooks.append(lin.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(tokens.shape[0]):
                model(input_ids=tokens[i : i + 1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: s["value"] for name, s in found.items()}


def sequential_prune(model, tokens: torch.Tensor, pruner, sparsity: float) -> dict[tuple[int, str], torch.Tensor]:
    """Prune ``model`` in place block by block, each block observed through whole-model
    forwards of the partly pruned model. Returns every linear's mask."""
    _, blocks = find_blocks(model)
    masks = {}
    for index, block in enumerate(blocks):
        stats = observe_block(model, tokens, index)
        for name, lin in find_linears(block).items():
            weight = linear_weight_view(lin)
            mask = pruner.prune(weight, {"col_sq_norm": stats[name]}, sparsity)
            weight[mask] = 0
            masks[(index, name)] = mask
    return masks


def block_inputs(model, tokens: torch.Tensor) -> dict[int, list[tuple[torch.Tensor, dict]]]:
    """What every block receives in a whole-model forward: hidden states and keyword args."""
    _, blocks = find_blocks(model)
    seen: dict[int, list] = {i: [] for i in range(len(blocks))}
    hooks = []
    for i, block in enumerate(blocks):
        def pre(_m, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i].append((hidden.detach().clone(), dict(kwargs)))

        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            for i in range(tokens.shape[0]):
                model(input_ids=tokens[i : i + 1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen
