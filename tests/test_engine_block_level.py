"""The block-level hook on every row of the architecture table: the context's forward
reproduces the engine's dense outputs, a backward pass through each family's block works, and
regional optimisation lowers each block's error against the dense block without reviving a
pruned weight."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine_architectures import ARCHS, SAMPLES, SEQLEN, build

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.pruners.magnitude import MagnitudePruner
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruners.wandapp import WandaPPConfig, WandaPPPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.regional import visitor as regional_visitor
from wanda_pipeline.regional.config import ReconstructConfig
from wanda_pipeline.regional.visitor import BlockPruneVisitor


class Backward:
    """A block-level visitor that changes nothing: it replays each batch, with and without
    gradients, and backpropagates the output norm to every linear."""

    def __init__(self):
        self.blocks, self.grad_norms = [], {}

    def required_stats(self):
        return set()

    def visit_block(self, ctx):
        self.blocks.append(ctx.index)
        assert ctx.batches == len(ctx.dense) == len(ctx.calls) > 0
        for b in range(ctx.batches):
            torch.testing.assert_close(ctx.forward(b), ctx.dense[b].to(ctx.device), rtol=0, atol=0)
        weights = [lin.weight for lin in ctx.linears.values()]
        with ctx.trainable(weights):
            out = ctx.forward(0, grad=True)
            assert out.requires_grad and out.shape == ctx.dense[0].shape
            grads = torch.autograd.grad(out.float().norm(), weights)
        for name, g in zip(ctx.linears, grads, strict=True):
            self.grad_norms[(ctx.index, name)] = float(g.norm())
        return False


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_row_runs_a_block_level_visitor_with_a_backward(arch, tokens_gen):
    model = build(arch)
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    visitor = Backward()
    LayerEngine(progress=False, batch_size=2).run(model, tokens_gen(128, SAMPLES, SEQLEN), visitor)
    n_blocks = len(find_blocks(model)[1])
    assert visitor.blocks == list(range(n_blocks))
    per_block = len(find_linears(find_blocks(model)[1][0]))
    assert len(visitor.grad_norms) == n_blocks * per_block
    assert all(0 < g < float("inf") for g in visitor.grad_norms.values()), visitor.grad_norms
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _error(ctx) -> float:
    """Squared error of the block's outputs against the dense block's, written out here."""
    with torch.no_grad():
        return sum(float(((ctx.forward(b).double() - ctx.dense[b].double()) ** 2).sum()) for b in range(ctx.batches))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_default_reconstruction_lowers_block_error(arch, tokens_gen, monkeypatch):
    """The shipped defaults (one pass of Adam at 1e-3), not only a gentle test setting."""
    model = build(arch, seed=1)
    seen = []
    real = regional_visitor.optimise
    monkeypatch.setattr(regional_visitor, "optimise", lambda ctx, masks, config: seen.append(
        (ctx.index, _error(ctx), real(ctx, masks, config), _error(ctx))) or seen[-1][2])
    prune_model(model, tokens_gen(128, SAMPLES, SEQLEN, seed=1), WandaPruner(WandaConfig(sparsity=0.5)),
                LayerEngine(progress=False), reconstruct=ReconstructConfig())
    assert len(seen) == len(find_blocks(model)[1])
    for index, before, steps, after in seen:
        assert steps == SAMPLES  # every calibration sample once (fewer than the default 32 here)
        assert after < before, f"{arch} block {index}: error {before:.4g} -> {after:.4g}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_reconstruction_lowers_block_error_and_keeps_pruned_weights_zero(arch, tokens_gen, monkeypatch):
    model = build(arch, seed=1)
    seen = []
    real = regional_visitor.optimise

    def measured(ctx, masks, config):
        before = _error(ctx)
        zero_before = {n: linear_weight_view(lin) == 0 for n, lin in ctx.linears.items()}
        kept_before = {n: linear_weight_view(lin).clone() for n, lin in ctx.linears.items()}
        steps = real(ctx, masks, config)
        after = _error(ctx)
        for n, lin in ctx.linears.items():
            w = linear_weight_view(lin)
            assert torch.equal(masks[n], zero_before[n] & masks[n]), "the mask was applied before optimising"
            assert bool((w[masks[n]] == 0).all()), f"{arch} block {ctx.index} {n}: a pruned weight was revived"
            assert not torch.equal(w, kept_before[n]), f"{arch} block {ctx.index} {n}: kept weights never moved"
        seen.append((ctx.index, before, after, steps))
        return steps

    monkeypatch.setattr(regional_visitor, "optimise", measured)
    cfg = ReconstructConfig(iterations=3, samples=SAMPLES, lr=1e-4)
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=1)
    outcome = prune_model(model, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False),
                          reconstruct=cfg)
    assert [s[0] for s in seen] == list(range(len(find_blocks(model)[1])))
    for index, before, after, steps in seen:
        assert steps == 3 * SAMPLES
        assert after < before, f"{arch} block {index}: error {before:.4g} -> {after:.4g}"
    assert outcome.counters["reconstruct_steps"] == 3 * SAMPLES * len(seen)
    for block in find_blocks(model)[1]:  # per row exactly half, as Wanda's masks
        for lin in find_linears(block).values():
            w = linear_weight_view(lin)
            assert bool(((w == 0).sum(1) == w.shape[1] // 2).all())


def test_a_block_level_visitor_is_refused_with_one_pass(tokens_gen):
    model = build("llama")
    with pytest.raises(ConfigError, match="passes"):
        LayerEngine(progress=False, passes=1).run(model, tokens_gen(128, 2, 8), Backward())
    with pytest.raises(ConfigError, match="passes: 2"):
        prune_model(model, tokens_gen(128, 2, 8), MagnitudePruner(), LayerEngine(progress=False, passes=1),
                    reconstruct=ReconstructConfig())


def test_reconstruction_trains_only_the_included_linears(tokens_gen):
    model = build("llama", seed=3)
    dense = copy.deepcopy(model)
    prune_model(model, tokens_gen(128, 2, 16, seed=3), MagnitudePruner(), LayerEngine(progress=False, include="mlp"),
                reconstruct=ReconstructConfig(iterations=1, samples=2, lr=1e-3))
    for (name, got), want in zip(model.named_parameters(), dense.parameters(), strict=True):
        same = torch.equal(got, want)
        assert same == ("mlp" not in name or "layers" not in name or not name.endswith("weight")), name


def test_visitor_saves_weights_once_optimised_and_masks_otherwise(tokens_gen):
    model = build("llama", seed=4)
    tokens = tokens_gen(128, 2, 16, seed=4)
    for cfg, key in ((ReconstructConfig(iterations=0), "mask"), (ReconstructConfig(iterations=1, lr=1e-3), "weight")):
        visitor = BlockPruneVisitor(WandaPruner(), [0.5] * 4, cfg)
        LayerEngine(progress=False).run(copy.deepcopy(model), tokens, visitor)
        state = visitor.block_state(3, {})
        assert state and all(k.endswith(f".{key}") for k in state), sorted(state)


class GradientSpy(WandaPPPruner):
    """Wanda++ (score only) that keeps the regional gradients it computed, per block."""

    def __init__(self):
        super().__init__(WandaPPConfig(ro={"iterations": 0}))
        self.seen = []

    def block_stats(self, ctx):
        out = super().block_stats(ctx)
        self.seen.append({n: s["regional_grad"].clone() for n, s in out.items()})
        return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_regional_gradients_do_not_depend_on_the_batch_size(arch, tokens_gen):
    """One backward per sample, also inside a batch: batches of 1 and of 2 give the same G."""
    tokens = tokens_gen(128, 4, SEQLEN, seed=5)
    spies = []
    for batch in (1, 2):
        spy = GradientSpy()
        prune_model(build(arch, seed=5), tokens, spy, LayerEngine(progress=False, batch_size=batch))
        spies.append(spy)
    assert len(spies[0].seen) == len(find_blocks(build(arch))[1])
    for one, two in zip(spies[0].seen[:1], spies[1].seen[:1], strict=True):  # block 0: the same inputs
        for name in one:
            assert float(one[name].abs().max()) > 0, name
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7)


def test_a_block_without_linears_in_scope_is_left_alone(tokens_gen):
    model = build("llama", seed=6)
    dense = copy.deepcopy(model)
    prune_model(model, tokens_gen(128, 2, 8, seed=6), WandaPPPruner(WandaPPConfig(ro={"lr": 1e-3})),
                LayerEngine(progress=False, include="no_such_linear"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values(),
                                                 strict=True))
