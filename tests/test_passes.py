"""passes=1: one calibration forward per block, each linear pruned when its input arrives.
Checked over the architecture table against a slow true-sequential reference written here:
for block i, linear by linear in execution order, its input is observed through whole-model
forwards (one sample at a time) with blocks 0..i-1 and the earlier linears of block i pruned."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine_architectures import ARCHS, SAMPLES, SEQLEN, build

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.engine.onepass import join_calls
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model


def execution_order(model, tokens, block) -> list[str]:
    order, hooks = [], []
    for name, lin in find_linears(block).items():
        first = lambda *_a, name=name: order.append(name) if name not in order else None  # noqa: E731
        hooks.append(lin.register_forward_hook(first))
    with torch.no_grad():
        model(input_ids=tokens[:1], use_cache=False)
    for h in hooks:
        h.remove()
    return order


def col_sq_norm(model, tokens, lin) -> torch.Tensor:
    """Sum over samples of squared input column norms, divided by the sample count."""
    total = torch.zeros(linear_weight_view(lin).shape[1])

    def hook(_m, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        total.add_((x * x).sum(dim=0))

    h = lin.register_forward_hook(hook)
    with torch.no_grad():
        for i in range(tokens.shape[0]):
            model(input_ids=tokens[i : i + 1], use_cache=False)
    h.remove()
    return total / tokens.shape[0]


def true_sequential_masks(model, tokens, pruner, sparsity):
    _, blocks = find_blocks(model)
    masks = {}
    for index, block in enumerate(blocks):
        linears = find_linears(block)
        for name in execution_order(model, tokens, block):
            weight = linear_weight_view(linears[name])
            mask = pruner.prune(weight, {"col_sq_norm": col_sq_norm(model, tokens, linears[name])}, sparsity)
            with torch.no_grad():
                weight[mask] = 0
            masks[(index, name)] = mask
    return masks


@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_pass_masks_equal_the_true_sequential_reference(arch, tokens_gen):
    model = build(arch, seed=2)
    reference = copy.deepcopy(model)
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=2)
    pruner = WandaPruner(WandaConfig(sparsity=0.5))
    prune_model(model, tokens, pruner, LayerEngine(progress=False, passes=1))
    masks = true_sequential_masks(reference, tokens, pruner, 0.5)
    _, blocks = find_blocks(model)
    total = differ = 0
    for (b, name), mask in masks.items():
        weight = linear_weight_view(find_linears(blocks[b])[name])
        differ += int(((weight == 0) != mask).sum())
        total += mask.numel()
    # The engine's one batched forward and the reference's per-sample forwards round differently;
    # a weight exactly at a row's threshold may flip.
    assert differ == 0, f"{arch}: {differ} of {total} mask entries differ from the reference"


def fails_at(block: int, per_block: int) -> WandaPruner:
    """A real Wanda pruner whose run crashes at the first linear of ``block`` (a killed run);
    same class and config, so its checkpoint belongs to the same run."""
    pruner = WandaPruner(WandaConfig(sparsity=0.5))
    inner, calls = pruner.prune, []

    def prune(weight, stats, sparsity):
        if len(calls) == block * per_block:
            raise RuntimeError("killed")
        calls.append(1)
        return inner(weight, stats, sparsity)

    pruner.prune = prune
    return pruner


def _zeros(model):
    return [linear_weight_view(lin) == 0 for b in find_blocks(model)[1] for lin in find_linears(b).values()]


def test_one_pass_resumes_to_the_uninterrupted_masks(tmp_path, tokens_gen):
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=3)
    whole, crashed = build("qwen2-sliding", seed=3), build("qwen2-sliding", seed=3)
    resumed = copy.deepcopy(crashed)
    prune_model(whole, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False, passes=1))
    per_block = len(find_linears(find_blocks(crashed)[1][0]))
    with pytest.raises(Exception, match="killed"):
        prune_model(crashed, tokens, fails_at(2, per_block), LayerEngine(progress=False, passes=1),
                    checkpoint_dir=tmp_path)
    out = prune_model(resumed, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False, passes=1),
                      checkpoint_dir=tmp_path)
    assert out.engine.resumed_at == 2
    assert all(torch.equal(a, b) for a, b in zip(_zeros(whole), _zeros(resumed), strict=True))


def test_a_passes_2_checkpoint_is_not_resumed_with_passes_1(tmp_path, tokens_gen):
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=3)
    model = build("llama", seed=3)
    per_block = len(find_linears(find_blocks(model)[1][0]))
    with pytest.raises(Exception, match="killed"):
        prune_model(model, tokens, fails_at(1, per_block), LayerEngine(progress=False), checkpoint_dir=tmp_path)
    with pytest.raises(Exception, match="passes"):
        prune_model(build("llama", seed=3), tokens, WandaPruner(WandaConfig(sparsity=0.5)),
                    LayerEngine(progress=False, passes=1), checkpoint_dir=tmp_path)


def test_sparsegpt_runs_in_one_pass(tokens_gen):
    from wanda_pipeline.pruners.sparsegpt import SparseGPTConfig, SparseGPTPruner

    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=4)
    model = build("llama", seed=4)
    prune_model(model, tokens, SparseGPTPruner(SparseGPTConfig(sparsity=0.5)), LayerEngine(progress=False, passes=1))
    for z in _zeros(model):
        assert abs(z.float().mean().item() - 0.5) < 0.02


def test_batches_that_cannot_be_joined_are_refused():
    h = [torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)]
    ok = torch.zeros(1, 4)
    hidden, _rest, kw = join_calls(h, [((), {"pos": ok, "mask": torch.ones(2, 4)}), ((), {"pos": ok,
                                                                                          "mask": torch.zeros(2, 4)})])
    assert hidden.shape[0] == 4 and kw["pos"] is ok and torch.equal(kw["mask"][2:], torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="passes: 2"):
        join_calls(h, [((), {"m": torch.zeros(3, 4)}), ((), {"m": torch.ones(3, 4)})])
    with pytest.raises(ConfigError, match="passes: 2"):
        join_calls(h, [((), {"w": 4}), ((), {"w": 5})])


def test_one_pass_streams_to_the_in_memory_result(tokens_gen, tmp_path):
    from transformers import AutoModelForCausalLM

    from wanda_pipeline.engine import ShardSource
    from wanda_pipeline.engine.skeleton import build_skeleton
    from wanda_pipeline.pruning import finish_streaming, streaming_io

    build("gemma2", seed=3).save_pretrained(tmp_path / "src", max_shard_size="200KB")
    tokens = tokens_gen(128, SAMPLES, SEQLEN, seed=3)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    prune_model(dense, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False, passes=1))
    skeleton = build_skeleton(tmp_path / "src", torch.float32)
    ShardSource(skeleton, tmp_path / "src")
    io = streaming_io(skeleton, str(tmp_path / "out"))
    outcome = prune_model(skeleton, tokens, WandaPruner(WandaConfig(sparsity=0.5)),
                          LayerEngine(progress=False, passes=1), source=io[0], sink=io[1])
    finish_streaming(skeleton, io, outcome)
    written = AutoModelForCausalLM.from_pretrained(outcome.streamed_to).state_dict()
    expected = dense.state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
