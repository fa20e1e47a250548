"""The layer engine across decoder architectures, one row per architecture, tiny random
models built here from configs. Each row checks that (a) every block gets exactly the inputs a
whole-model forward gives it (hidden states, its own attention mask, rotary table...) and
(b) ``prune`` writes the masks of the slow whole-model reference in sequential_reference.py.
Sliding windows are shorter than the calibration windows, so per-layer masks differ."""

from __future__ import annotations

import copy

import pytest
import torch
from sequential_reference import block_inputs, observe_block, sequential_prune
from torch import nn

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model

SEQLEN, WINDOW, SAMPLES = 32, 12, 3
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, vocab_size=128)

ARCHS = {
    "llama": ("llama", LLAMA_LIKE),
    "mistral-sliding": ("mistral", dict(LLAMA_LIKE, sliding_window=WINDOW)),
    "qwen2-sliding": ("qwen2", dict(LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "qwen3": ("qwen3", dict(LLAMA_LIKE, head_dim=8)),
    "gemma2": ("gemma2", dict(LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8)),
    "gemma3-text": ("gemma3_text", dict(LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                        layer_types=["sliding_attention", "full_attention"] * 2)),
    "phi3": ("phi3", dict(LLAMA_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": ("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                        max_position_embeddings=128, word_embed_proj_dim=32, vocab_size=128)),
    "gpt-neox": ("gpt_neox", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  max_position_embeddings=128, vocab_size=128)),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=4, n_head=4, n_positions=128, vocab_size=128, bos_token_id=0,
                          eos_token_id=0)),
}


def build(arch: str, seed: int = 0) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    model.eval()
    return model


class Feeds:
    """A visitor that changes nothing; pre-hooks record what the engine feeds each block."""

    def __init__(self):
        self.seen: dict[int, list] = {}

    def required_stats(self):
        return {"col_sq_norm"}

    def visit(self, index, block, linears, stats):
        return False


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def engine_feeds(model, tokens):
    _, blocks = find_blocks(model)
    seen = {i: [] for i in range(len(blocks))}
    hooks = [b.register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: seen[i].append((args[0].detach().clone(), dict(kwargs))), with_kwargs=True)
        for i, b in enumerate(blocks)]
    try:
        LayerEngine(progress=False).run(model, tokens, Feeds())
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_block_gets_its_own_inputs(arch, tokens_gen):
    model = build(arch)
    tokens = tokens_gen(128, SAMPLES, SEQLEN)
    expected = block_inputs(model, tokens)
    got = engine_feeds(model, tokens)
    for i in expected:
        # the engine observes each block once per batch (no second forward: nothing changed)
        assert len(got[i]) == len(expected[i]) == SAMPLES
        for (h_ref, kw_ref), (h, kw) in zip(expected[i], got[i], strict=True):
            torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
            for key, value in kw_ref.items():
                assert _equal(kw.get(key), value), f"{arch}: block {i} gets a different {key!r}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prune_writes_the_sequential_reference_masks(arch, tokens_gen):
    model = build(arch, seed=1)
    reference = copy.deepcopy(model)
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=1)
    pruner = WandaPruner(WandaConfig(sparsity=0.5))
    prune_model(model, tokens, pruner, LayerEngine(progress=False))
    masks = sequential_prune(reference, tokens, pruner, 0.5)
    _, blocks = find_blocks(model)
    for (b, name), mask in masks.items():
        weight = linear_weight_view(find_linears(blocks[b])[name])
        differ = int(((weight == 0) != mask).sum())
        assert differ == 0, f"{arch}: block {b} {name}: {differ} mask entries differ from the reference"


class StatsSpy(WandaPruner):
    """Wanda that keeps the statistics the engine hands it, per block (a real pruner)."""

    def __init__(self):
        super().__init__(WandaConfig(sparsity=0.5))
        self.seen = []

    def prune(self, weight, stats, sparsity):
        self.seen.append(stats["col_sq_norm"].clone())
        return super().prune(weight, stats, sparsity)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_each_block_sees_the_pruned_blocks_before_it(arch, tokens_gen):
    """At block k, the statistics handed to the pruner equal those of a whole-model forward
    through a copy whose blocks 0..k-1 carry the same masks."""
    model = build(arch, seed=2)
    model.model.layers = model.model.layers[:3]
    dense = copy.deepcopy(model)
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=2)
    spy = StatsSpy()
    prune_model(model, tokens, spy, LayerEngine(progress=False))
    _, pruned_blocks = find_blocks(model)
    _, dense_blocks = find_blocks(dense)
    seen = iter(spy.seen)
    for k in range(3):
        expected = observe_block(dense, tokens, k)
        for name in find_linears(dense_blocks[k]):
            torch.testing.assert_close(next(seen), expected[name], rtol=1e-5, atol=1e-6)
        for name, lin in find_linears(dense_blocks[k]).items():  # give the copy block k's masks
            pruned = linear_weight_view(find_linears(pruned_blocks[k])[name])
            linear_weight_view(lin)[pruned == 0] = 0


class _ScaledBetweenBlocks(nn.Module):
    """A model whose forward rescales hidden states between blocks: not replayable."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2))

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h) * 2
        return h

    def get_input_embeddings(self):
        return self.embed


class _CacheObject:
    pass


class _PassesState(_ScaledBetweenBlocks):
    """A model that hands its blocks a shared state object (like a KV cache)."""

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        state = _CacheObject()
        for layer in self.layers:
            h = layer(h, state=state)
        return h


@pytest.mark.parametrize("model_cls, words", [(_ScaledBetweenBlocks, "transforms or mixes hidden states"),
                                              (_PassesState, "_CacheObject")])
def test_unreplayable_architectures_get_a_clear_error(model_cls, words, tokens_gen):
    model = model_cls()
    with pytest.raises(ConfigError, match="not supported by the layer engine") as err:
        LayerEngine(progress=False).capture(model, tokens_gen(16, 2, 4))
    assert words in str(err.value) and model_cls.__name__ in str(err.value)
