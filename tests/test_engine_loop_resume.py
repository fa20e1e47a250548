"""Resuming inside the layer loop, against an in-memory checkpoint: finished blocks get their
saved state back (through the visitor's ``restore_state`` or, without one, as plain weights of
the filtered linears), the rest continue from the saved activations, and the result equals an
uninterrupted run."""

from __future__ import annotations

import copy

import pytest
import torch

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.tiny_models import tiny_model

LAYERS, START = 4, 2


class ZeroWeakestColumn:
    """A pruner in miniature: per linear, zero the input column with the smallest statistic."""

    def required_stats(self):
        return {"col_sq_norm"}

    def visit(self, index, block, linears, stats):
        for name, lin in linears.items():
            linear_weight_view(lin)[:, stats[name]["col_sq_norm"].argmin()] = 0
        return True


class WithRestore(ZeroWeakestColumn):
    def __init__(self):
        self.restored = []

    def restore_state(self, index, linears, state):
        self.restored.append((index, sorted(linears), sorted(state)))
        for name, lin in linears.items():
            linear_weight_view(lin).copy_(state[f"{name}.weight"])


class MemoryCheckpoint:
    """Saves everything; resumes at ``at`` with what an earlier run saved."""

    def __init__(self, at=0, earlier=None):
        self.at, self.saved = at, dict(earlier.saved) if earlier else {}

    def start(self, n_blocks):
        return self.at

    def save(self, index, state, outputs):
        self.saved[index] = ({k: v.clone() for k, v in state.items()}, [o.clone() for o in outputs])

    def block_state(self, index):
        return self.saved[index][0]

    def inputs(self, index):
        return self.saved[index - 1][1]


def weights(model):
    return {f"{i}.{n}": linear_weight_view(lin).clone()
            for i, block in enumerate(find_blocks(model)[1]) for n, lin in find_linears(block).items()}


def run(visitor, engine, checkpoint, tokens, seed=7):
    model = tiny_model("llama", seed=seed, layers=LAYERS)
    report = engine.run(model, tokens, visitor, checkpoint=checkpoint)
    return model, report


@pytest.mark.parametrize("filters", [dict(), dict(include="mlp"), dict(exclude="self_attn")])
@pytest.mark.parametrize("visitor_cls", [ZeroWeakestColumn, WithRestore])
def test_a_resumed_run_equals_the_uninterrupted_one(filters, visitor_cls, tokens_gen, capsys):
    tokens = tokens_gen(128, 3, 8, seed=7)
    engine = LayerEngine(progress=False, batch_size=2, **filters)
    full_ckpt = MemoryCheckpoint()
    full, _ = run(visitor_cls(), engine, full_ckpt, tokens)
    capsys.readouterr()

    visitor = visitor_cls()
    resumed, report = run(visitor, engine, MemoryCheckpoint(START, full_ckpt), tokens)
    assert f"resuming at block {START} of {LAYERS}" in capsys.readouterr().out
    assert report.resumed_at == START and report.blocks == LAYERS and len(report.seconds_per_block) == LAYERS - START
    assert [r["step"] for r in report.block_metrics()] == [2, 3]
    want, got = weights(full), weights(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # something was pruned, and only the filtered linears
    dense = weights(tiny_model("llama", seed=7, layers=LAYERS))
    changed = {k for k in want if not torch.equal(want[k], dense[k])}
    kept = set(find_linears(find_blocks(full)[1][0], engine.include, engine.exclude))
    assert changed == {f"{i}.{n}" for i in range(LAYERS) for n in kept}
    if visitor_cls is WithRestore:
        assert visitor.restored == [(i, sorted(kept), sorted(f"{n}.weight" for n in kept)) for i in range(START)]


def test_a_finished_checkpoint_restores_every_block_and_runs_none(tokens_gen):
    tokens = tokens_gen(128, 2, 8, seed=8)
    engine = LayerEngine(progress=False)
    full_ckpt = MemoryCheckpoint()
    full, _ = run(ZeroWeakestColumn(), engine, full_ckpt, tokens, seed=8)

    class Refuse(ZeroWeakestColumn):
        def visit(self, *a):
            raise AssertionError("a finished block was visited again")

    resumed, report = run(Refuse(), engine, MemoryCheckpoint(LAYERS, full_ckpt), None, seed=8)
    assert report.resumed_at == LAYERS and report.seconds_per_block == [] and report.capture_seconds == 0.0
    want, got = weights(full), weights(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_restored_weights_keep_their_dtype(tokens_gen):
    """A state saved in another dtype is copied into the block's own weights, cast."""
    model = tiny_model("llama", seed=9, layers=2)
    blocks = find_blocks(model)[1]
    state = {f"{n}.weight": torch.ones_like(linear_weight_view(lin), dtype=torch.float64) * 0.5
             for n, lin in find_linears(blocks[0]).items()}
    ckpt = MemoryCheckpoint(1)
    ckpt.saved[0] = (state, [])
    before = copy.deepcopy(blocks[0])
    LayerEngine(progress=False).run(model, None, _NoStats(), checkpoint=ckpt)
    for name, lin in find_linears(blocks[0]).items():
        w = linear_weight_view(lin)
        assert w.dtype == torch.float32 and torch.equal(w, torch.full_like(w, 0.5)), name
    assert torch.equal(blocks[0].input_layernorm.weight, before.input_layernorm.weight)  # not a linear


class _NoStats:
    def required_stats(self):
        return set()

    def visit(self, index, block, linears, stats):
        assert stats == {}
        return False
