"""GPTQ inside the engine's block loop: pruned zeros stay zero on every row of the architecture
table; each linear is calibrated on what the pruned *and quantized* model feeds it (checked
against whole-model forwards written here), with passes=2 and passes=1. Resume, streaming and
the loop's checks: test_gptq_resume.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine_architectures import ARCHS, SAMPLES, SEQLEN, build

from wanda_pipeline import stages
from wanda_pipeline.config import EngineSpec
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import RunError
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import PruneVisitor, prune_model
from wanda_pipeline.quantizers.calibrated import CalibratedQuantize
from wanda_pipeline.quantizers.gptq import GPTQConfig, GPTQQuantizer

CFG = GPTQConfig(bits=4, group_size=16)


class MaskSpy(WandaPruner):
    def __init__(self, sparsity=0.5):
        super().__init__(WandaConfig(sparsity=sparsity))
        self.masks = []

    def prune(self, weight, stats, sparsity):
        mask = super().prune(weight, stats, sparsity)
        self.masks.append(mask.clone())
        return mask


class GramSpy(GPTQQuantizer):
    def __init__(self, config=CFG):
        super().__init__(config)
        self.grams = []

    def quantize_weight(self, weight, stats=None):
        self.grams.append(stats["gram"].clone())
        return super().quantize_weight(weight, stats)


def named_linears(model) -> list[tuple[int, str, torch.nn.Module]]:
    return [(b, n, lin) for b, block in enumerate(find_blocks(model)[1]) for n, lin in find_linears(block).items()]


def forward_grams(model, tokens) -> dict[tuple[int, str], torch.Tensor]:
    """2/n X^T X of every block linear's input over whole-model forwards, one sample at a time."""
    grams, hooks = {}, []
    for b, name, lin in named_linears(model):
        grams[(b, name)] = 0

        def hook(_m, args, _out, key=(b, name)):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[key] = grams[key] + x.t() @ x

        hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(tokens.shape[0]):
            model(input_ids=tokens[i : i + 1], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: (2 / tokens.shape[0] * v).float() for k, v in grams.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pruned_zeros_stay_zero_and_every_linear_is_on_the_grid(arch, tokens_gen):
    model = build(arch, seed=1)
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=1)
    pruner, quantizer = MaskSpy(), GPTQQuantizer(CFG)
    outcome = prune_model(model, tokens, pruner, LayerEngine(progress=False), quantizer=quantizer)
    found = named_linears(model)
    assert len(pruner.masks) == len(found) == outcome.quantized.linears
    for (b, name, lin), mask in zip(found, pruner.masks, strict=True):
        weight = linear_weight_view(lin).detach()
        assert int(mask.sum()) > 0 and bool((weight[mask] == 0).all()), f"{arch}: block {b} {name}: a zero moved"
        codes = quantizer.codes_for(weight)
        assert codes is not None, f"{arch}: block {b} {name} is not a GPTQ result"
        assert torch.equal(codes.dequantize().to(weight.dtype), weight)
        assert int(codes.codes.min()) >= -8 and int(codes.codes.max()) <= 7
    tally = outcome.quantized
    assert tally.zeros_before == sum(int(m.sum()) for m in pruner.masks) <= tally.zeros_after
    assert outcome.counters["quantizer_linears"] == len(found)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_each_block_is_calibrated_on_the_quantized_blocks_before_it(arch, tokens_gen):
    """passes=2: block k's linears get the Gram matrix of a whole-model forward through a copy
    whose blocks 0..k-1 hold the final (pruned and quantized) weights and block k is dense."""
    model = build(arch, seed=2)
    model.model.layers = model.model.layers[:3]
    reference = copy.deepcopy(model)
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=2)
    spy = GramSpy()
    prune_model(model, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False), quantizer=spy)
    got = iter(spy.grams)
    final = {(b, n): linear_weight_view(lin) for b, n, lin in named_linears(model)}
    for k in range(3):
        expected = forward_grams(reference, tokens)
        for b, name, _lin in named_linears(reference):
            if b == k:
                torch.testing.assert_close(next(got), expected[(b, name)], rtol=1e-4, atol=1e-5)
        for b, name, lin in named_linears(reference):
            if b == k:  # from now on the copy's block k is the finished one
                linear_weight_view(lin).copy_(final[(b, name)])


class Recording(CalibratedQuantize):
    def __init__(self, *a):
        super().__init__(*a)
        self.grams = {}

    def visit(self, index, block, linears, stats):
        for name in linears:
            self.grams[(index, name)] = stats[name]["gram"].clone()
        return super().visit(index, block, linears, stats)


def test_passes_1_quantizes_each_linear_before_it_runs(tokens_gen):
    """passes=1: every linear is pruned and quantized in its pre-hook, so its Gram matrix is
    that of a whole-model forward through the *final* model (everything before it is final)."""
    model = build("llama", seed=4)
    model.model.layers = model.model.layers[:2]
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=4)
    quantizer = GPTQQuantizer(CFG)
    visitor = Recording(PruneVisitor(WandaPruner(WandaConfig(sparsity=0.5)), [0.5, 0.5]), quantizer)
    LayerEngine(progress=False, passes=1).run(model, tokens, visitor)
    expected = forward_grams(model, tokens)
    assert visitor.grams.keys() == expected.keys()
    for key, gram in visitor.grams.items():
        torch.testing.assert_close(gram, expected[key], rtol=1e-4, atol=1e-5, msg=f"{key}")
    for _, _, lin in named_linears(model):
        assert quantizer.codes_for(linear_weight_view(lin).detach()) is not None


def test_the_quantize_stage_refuses_a_calibrated_quantizer_outside_the_loop():
    model = build("llama")
    with pytest.raises(RunError, match="runs in the prune stage"):
        stages.quantize(model, GPTQQuantizer(CFG), EngineSpec())
