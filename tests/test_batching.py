"""Batched calibration forwards: statistics accumulate exactly (same block inputs, any batch
size), end-to-end masks agree with batch size 1, and ``batch_size: auto`` resolves sanely."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from wanda_pipeline.config import EngineSpec
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.engine.batching import auto_batch_size, per_sample_bytes
from wanda_pipeline.engine.onepass import join_calls
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.tiny_models import tiny_model

N, SEQLEN = 4, 16


def regroup(inputs, calls, b):
    """Per-sample recorded inputs and arguments joined into batches of ``b``."""
    groups = [join_calls(inputs[i : i + b], calls[i : i + b]) for i in range(0, len(inputs), b)]
    return [g[0] for g in groups], [(g[1], g[2]) for g in groups]


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_block_statistics_from_the_same_inputs_do_not_depend_on_batch_size(family, tokens_gen):
    model = tiny_model(family, seed=5, layers=2)
    tokens = tokens_gen(model.config.vocab_size, N, SEQLEN, seed=5)
    engine = LayerEngine(batch_size=1, progress=False)
    captured = engine.capture(model, tokens)
    _, blocks = find_blocks(model)
    linears = find_linears(blocks[0])
    one, _ = engine.observe(blocks[0], linears, captured.inputs, captured.block_calls(0), {"col_sq_norm"})
    for b in (2, 4):
        inputs, calls = regroup(captured.inputs, captured.block_calls(0), b)
        stats, _ = engine.observe(blocks[0], linears, inputs, calls, {"col_sq_norm"})
        for name in linears:
            torch.testing.assert_close(stats[name]["col_sq_norm"], one[name]["col_sq_norm"], rtol=1e-5, atol=1e-7)


def _zeros(model) -> torch.Tensor:
    return torch.cat([(linear_weight_view(lin) == 0).flatten()
                      for block in find_blocks(model)[1] for lin in find_linears(block).values()])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_masks_with_larger_batches_agree_with_batch_size_1(family, tokens_gen):
    tokens = tokens_gen(128, N, SEQLEN, seed=6)
    masks = {}
    for b in (1, 2, 4, "auto"):
        model = tiny_model(family, seed=6, layers=2)
        prune_model(model, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(batch_size=b, progress=False))
        masks[b] = _zeros(model)
    for b in (2, 4, "auto"):
        agree = (masks[b] == masks[1]).float().mean().item()
        assert agree >= 0.9999, f"batch {b}: {agree:.6f} of mask entries agree with batch 1"


def test_auto_batch_size_fits_free_memory(tokens_gen):
    model = tiny_model("llama", seed=0, layers=2)
    tokens = tokens_gen(model.config.vocab_size, 64, 8, seed=0)
    batch = auto_batch_size(model, tokens, torch.device("cpu"))
    assert 1 <= batch <= 16  # tiny model, plenty of RAM: the CPU cap
    assert auto_batch_size(model, tokens[:3], torch.device("cpu")) == 3  # never more than the sequences
    assert per_sample_bytes(model, 2048) > 2 * per_sample_bytes(model, 1024)  # attention grows quadratically


def test_engine_spec_batch_size_and_threads():
    assert EngineSpec(batch_size="auto").batch_size == "auto"
    assert EngineSpec().passes == 2 and EngineSpec().batch_size == 1
    for bad in ({"batch_size": 0}, {"batch_size": "big"}, {"passes": 3}, {"threads": 0}):
        with pytest.raises(ValidationError):
            EngineSpec(**bad)


def test_threads_are_set_while_pruning_and_restored(tokens_gen):
    model = tiny_model("llama", seed=0, layers=2)
    tokens = tokens_gen(model.config.vocab_size, 2, 8, seed=0)
    before, seen = torch.get_num_threads(), []

    class Spy(WandaPruner):
        def prune(self, weight, stats, sparsity):
            seen.append(torch.get_num_threads())
            return super().prune(weight, stats, sparsity)

    prune_model(model, tokens, Spy(WandaConfig(sparsity=0.5)), LayerEngine(progress=False, threads=1))
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_prune_flags_reach_the_engine_spec():
    import argparse

    from wanda_pipeline.cli_prune import add_prune_parser, prune_spec

    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers())
    spec = prune_spec(parser.parse_args(["prune", "--model", "m", "--passes", "1", "--batch-size", "auto",
                                         "--threads", "1"]))
    assert (spec.engine.passes, spec.engine.batch_size, spec.engine.threads) == (1, "auto", 1)
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--model", "m", "--batch-size", "many"])
