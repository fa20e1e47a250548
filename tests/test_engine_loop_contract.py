"""What the layer engine promises a visitor and a caller, on tiny models and toy blocks:
the visit arguments, when one-pass mode is used, thread settings, the auto batch size, the
per-block peak memory, and how recorded block calls are replayed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wanda_pipeline.engine import batching
from wanda_pipeline.engine.batching import per_sample_bytes
from wanda_pipeline.engine.loop import LayerEngine
from wanda_pipeline.models import find_blocks
from wanda_pipeline.tiny_models import tiny_model


class Recording:
    """Records each visit; prunes nothing."""

    def __init__(self, stats: set[str], one_pass: bool | None = None):
        self.stats, self.visits, self.threads = stats, [], []
        if one_pass is not None:
            self.one_pass = one_pass

    def required_stats(self) -> set[str]:
        return self.stats

    def visit(self, index, block, linears, stats) -> bool:
        self.visits.append((index, block, sorted(linears), stats))
        self.threads.append(torch.get_num_threads())
        return False


def test_passes_other_than_1_or_2_are_refused_with_the_value():
    with pytest.raises(ValueError, match="passes must be 1 or 2, got 3"):
        LayerEngine(passes=3)


def test_a_visitor_without_statistics_gets_each_real_block(tokens_gen):
    model = tiny_model("llama", layers=2)
    _, blocks = find_blocks(model)
    visitor = Recording(set())
    LayerEngine(progress=False).run(model, tokens_gen(128, 2, 8), visitor)
    assert [(i, b) for i, b, _, _ in visitor.visits] == [(0, blocks[0]), (1, blocks[1])]
    assert all(names and stats == {} for _, _, names, stats in visitor.visits)


@pytest.mark.parametrize("one_pass, per_linear", [(None, False), (False, False), (True, True)],
                         ids=["no-attribute", "declined", "one-pass"])
def test_passes_1_prunes_in_the_forward_only_for_visitors_that_say_so(tokens_gen, one_pass, per_linear):
    """A visitor without ``one_pass = True`` keeps the two-pass contract (one visit per block with
    every linear); a one-pass visitor is visited once per linear inside the forward."""
    model = tiny_model("llama", layers=1)
    linears = {name for name, m in find_blocks(model)[1][0].named_modules() if isinstance(m, nn.Linear)}
    visitor = Recording({"col_sq_norm"}, one_pass)
    LayerEngine(passes=1, progress=False).run(model, tokens_gen(128, 2, 8), visitor)
    if per_linear:
        assert sorted(n for _, _, names, _ in visitor.visits for n in names) == sorted(linears)
        assert all(len(names) == 1 for _, _, names, _ in visitor.visits)
    else:
        assert len(visitor.visits) == 1 and set(visitor.visits[0][2]) == linears


def test_threads_apply_during_the_run_and_are_restored(tokens_gen, monkeypatch):
    """Recorded, not applied: growing OpenMP's pool in a forked process (mutmut's children) can hang."""
    current = [torch.get_num_threads()]
    before = current[0]
    monkeypatch.setattr(torch, "get_num_threads", lambda: current[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: current.__setitem__(0, n))
    visitor = Recording({"col_sq_norm"})
    LayerEngine(threads=before + 1, progress=False).run(tiny_model("llama", layers=2), tokens_gen(128, 2, 8), visitor)
    assert visitor.threads == [before + 1, before + 1]
    assert current[0] == before


def test_auto_batch_size_follows_the_models_own_estimate(tokens_gen, monkeypatch):
    """Free memory for exactly 3 sequences of this model (far less than one of a 7B): batches of 3."""
    model, seqlen, n = tiny_model("llama", layers=1), 8, 7
    monkeypatch.setattr(batching, "free_bytes", lambda device: 3 * per_sample_bytes(model, seqlen) * 4)
    captured = LayerEngine(batch_size="auto", progress=False).capture(model, tokens_gen(128, n, seqlen))
    assert [h.shape[0] for h in captured.inputs] == [3, 3, 1]
    assert len(captured.inputs) == math.ceil(n / 3)


def test_peak_device_bytes_are_reported_per_block(tokens_gen, monkeypatch):
    monkeypatch.setattr(LayerEngine, "_peak", lambda self: 4096)
    report = LayerEngine(progress=False).run(tiny_model("llama", layers=3), tokens_gen(128, 2, 8),
                                             Recording({"col_sq_norm"}))
    assert report.peak_device_bytes == [4096, 4096, 4096]


class TupleBlock(nn.Module):
    """Returns (hidden, extra) as older transformers blocks did, and takes a positional scale."""

    def forward(self, hidden, scale, shift=0.0):
        return hidden * scale + shift, hidden * 100


def test_forward_replays_positional_and_keyword_arguments_and_unwraps_tuples():
    engine = LayerEngine(progress=False)
    hidden = [torch.ones(2, 3, 4), torch.full((1, 3, 4), 2.0)]
    scale = torch.tensor(3.0)  # one interned tensor shared by both calls
    calls = [((scale,), {"shift": 1.0}), ((scale,), {})]
    out = engine.forward(TupleBlock(), hidden, calls)
    assert torch.equal(out[0], torch.full((2, 3, 4), 4.0)) and torch.equal(out[1], torch.full((1, 3, 4), 6.0))
