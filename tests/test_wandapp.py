"""Wanda++: the regional gradient against autograd written out here on a hand-built block, the
score, and the conformance kit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wanda_pipeline.engine import BlockContext, LayerEngine
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruners.wandapp import WandaPPConfig, WandaPPPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.regional.gradient import regional_gradients
from wanda_pipeline.sparsity import select_mask
from wanda_pipeline.testing import PrunerConformance
from wanda_pipeline.tiny_models import tiny_model


class TestWandaPP(PrunerConformance):
    pruner_class = WandaPPPruner
    options = {"ro": {"iterations": 1, "samples": 2, "lr": 1e-4}}


class TestWandaPPScoreOnly(PrunerConformance):
    pruner_class = WandaPPPruner
    options = {"ro": {"iterations": 0}, "gradient": "mean_abs"}


class MLPBlock(nn.Module):
    """A hand-built residual two-layer MLP block that takes a scale keyword, as blocks take masks."""

    def __init__(self, d: int = 6, h: int = 10):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x, scale=None):
        return (x + self.down(torch.tanh(self.up(x))) * scale,)  # a tuple, as older blocks return


def by_hand(block: MLPBlock, samples: list[torch.Tensor], scale: torch.Tensor) -> dict[str, tuple]:
    """Per sample n: L_n = ||f(X_n)||_2, dL_n/dW by autograd on a functional copy of the block."""
    w_up = block.up.weight.detach().clone().requires_grad_(True)
    w_down = block.down.weight.detach().clone().requires_grad_(True)
    grads = {"up": [], "down": []}
    for x in samples:
        out = x + torch.tanh(x @ w_up.T + block.up.bias.detach()) @ w_down.T * scale
        g_up, g_down = torch.autograd.grad(torch.sqrt((out ** 2).sum()), [w_up, w_down])
        grads["up"].append(g_up)
        grads["down"].append(g_down)
    return {name: (torch.stack(g).pow(2).mean(0).sqrt(), torch.stack(g).abs().mean(0)) for name, g in grads.items()}


def mlp_context(batch: int) -> tuple[BlockContext, list[torch.Tensor], torch.Tensor]:
    """A hand-built block over 4 samples in batches of ``batch``: (context, samples, scale)."""
    torch.manual_seed(0)
    block = MLPBlock()
    samples = [torch.randn(1, 5, 6) for _ in range(4)]
    scale = torch.tensor(0.7)
    inputs = [torch.cat(samples[i:i + batch]) for i in range(0, 4, batch)]
    calls = [((), {"scale": scale})] * len(inputs)
    ctx = BlockContext(0, block, find_linears(block), {}, inputs, calls, [], torch.device("cpu"),
                       torch.device("cpu"), LayerEngine(progress=False).call)
    return ctx, samples, scale


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("aggregation", ["rms", "mean_abs"])
def test_regional_gradient_equals_autograd_by_hand(batch, aggregation):
    ctx, samples, scale = mlp_context(batch)
    block = ctx.block
    got = regional_gradients(ctx, aggregation)
    want = by_hand(block, samples, scale)
    pick = 0 if aggregation == "rms" else 1
    for name in ("up", "down"):
        torch.testing.assert_close(got[name], want[name][pick], rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for p in block.parameters()), "the block's own flags are put back"
    assert all(p.grad is None for p in block.parameters())


@pytest.mark.parametrize("batch, limit", [(1, 3), (2, 3), (4, 1), (2, 9)])
def test_regional_gradient_from_the_first_samples_only(batch, limit):
    """``gradient_samples``: G from the first ``limit`` samples, also when the limit cuts a batch."""
    ctx, samples, scale = mlp_context(batch)
    got = regional_gradients(ctx, "rms", limit)
    want = by_hand(ctx.block, samples[:limit], scale)
    for name in ("up", "down"):
        torch.testing.assert_close(got[name], want[name][0], rtol=1e-5, atol=1e-7)


def test_gradient_samples_reaches_the_regional_gradient(monkeypatch):
    seen = []
    monkeypatch.setattr("wanda_pipeline.pruners.wandapp.regional_gradients",
                        lambda ctx, aggregation, limit: seen.append((aggregation, limit)) or {})
    WandaPPPruner(WandaPPConfig(gradient_samples=8, alpha=1)).block_stats(None)
    WandaPPPruner(WandaPPConfig(gradient_samples=None)).block_stats(None)
    assert seen == [("rms", 8), ("rms", None)]


def test_score_only_with_alpha_zero_is_wanda():
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    a, b = tiny_model("llama", seed=1, layers=2), tiny_model("llama", seed=1, layers=2)
    prune_model(a, tokens, WandaPPPruner(WandaPPConfig(alpha=0, ro={"iterations": 0})), LayerEngine(progress=False))
    prune_model(b, tokens, WandaPruner(WandaConfig()), LayerEngine(progress=False))
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_block_zero_mask_is_the_regional_gradient_score(tokens_gen):
    """Block 0 of a tiny LLaMA: the mask is per row of (alpha*G + ||X||)*|W|, with G and ||X||
    computed here from a hooked whole-model forward and autograd on a copy of the block."""
    model = tiny_model("llama", seed=2, layers=2)
    dense = copy.deepcopy(model)
    tokens = tokens_gen(128, 3, 12, seed=2)
    prune_model(model, tokens, WandaPPPruner(WandaPPConfig(alpha=100, ro={"iterations": 0})),
                LayerEngine(progress=False))
    block = find_blocks(dense)[1][0]
    seen = []
    hook = block.register_forward_pre_hook(lambda _m, a, kw: seen.append((a[0].clone(), kw)), with_kwargs=True)
    linears = find_linears(block)
    inputs = {n: [] for n in linears}
    lin_hooks = [lin.register_forward_hook(lambda _m, a, _o, n=n: inputs[n].append(a[0].detach()))
                 for n, lin in linears.items()]
    with torch.no_grad():
        for i in range(3):
            dense(input_ids=tokens[i:i + 1], use_cache=False)
    hook.remove()
    for h in lin_hooks:
        h.remove()
    weights = [lin.weight for lin in linears.values()]
    sq = {n: torch.zeros_like(w) for n, w in zip(linears, weights, strict=True)}
    for hidden, kw in seen:
        out = block(hidden, **kw)
        out = out[0] if isinstance(out, tuple) else out
        for n, g in zip(linears, torch.autograd.grad(out.norm(), weights), strict=True):
            sq[n] += g * g
    pruned = find_linears(find_blocks(model)[1][0])
    for n, w in zip(linears, weights, strict=True):
        x_norm = torch.stack([x.reshape(-1, x.shape[-1]).norm(dim=0) for x in inputs[n]]).pow(2).mean(0).sqrt()
        score = (100 * (sq[n] / 3).sqrt() + x_norm) * w.detach().abs()
        want = select_mask(score, 0.5)
        got = linear_weight_view(pruned[n]) == 0
        assert int((got != want).sum()) == 0, n
