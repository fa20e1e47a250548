"""Pins on perplexity, the promotion gates and the calibration sampler, against values and
loops written out here. Fast, no data, no SmolLM2: tiny modules and a tiny tokenizer."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from wanda_pipeline.config import GateSpec
from wanda_pipeline.data import sample_windows
from wanda_pipeline.errors import ConfigError, DataError
from wanda_pipeline.evaluators.perplexity import PerplexityConfig, PerplexityEvaluator, perplexity
from wanda_pipeline.tracking.gates import SPARSITY_ROUNDING, evaluate_gates


class TableLM(nn.Module):
    """Next-token logits are a fixed row of ``table`` per input token (a bigram model)."""

    def __init__(self, table: torch.Tensor, max_positions: int = 64):
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=max_positions)

    def forward(self, input_ids, use_cache=None):
        assert use_cache is False, "evaluation must not build a KV cache"
        return SimpleNamespace(logits=self.table[input_ids])


def ppl_by_hand(table: torch.Tensor, tokens: list[int], seqlen: int, windows: int) -> float:
    """exp of the mean over windows of each window's mean next-token NLL."""
    logp = torch.log_softmax(table.double(), dim=-1)
    window_nll = []
    for w in range(windows):
        ids = tokens[w * seqlen : (w + 1) * seqlen]
        window_nll.append(sum(-float(logp[a, b]) for a, b in zip(ids[:-1], ids[1:], strict=True)) / (seqlen - 1))
    return math.exp(sum(window_nll) / windows)


@pytest.mark.parametrize("vocab", [7, 50])
def test_uniform_logits_give_perplexity_equal_to_vocab_size(vocab):
    tokens = torch.randint(0, vocab, (1, 41), generator=torch.Generator().manual_seed(0))
    ppl, used = perplexity(TableLM(torch.zeros(vocab, vocab)), tokens, seqlen=8, progress=False)
    assert ppl == pytest.approx(vocab, rel=1e-6) and used == 5


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("windows", [None, 4])
def test_perplexity_is_exp_of_mean_nll_written_out(batch_size, windows):
    g = torch.Generator().manual_seed(1)
    table = torch.randn(11, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (1, 5 * 9 + 4), generator=g)  # 5 windows of 9 and 4 left over
    ppl, used = perplexity(TableLM(table), tokens, 9, windows, batch_size=batch_size, progress=False)
    n = windows or 5
    assert used == n
    assert ppl == pytest.approx(ppl_by_hand(table, tokens[0].tolist(), 9, n), rel=1e-6)


def test_perplexity_evaluator_reports_the_protocol(tmp_path):
    class Tok:
        def __call__(self, text, return_tensors=None):
            assert return_tensors == "pt"
            return SimpleNamespace(input_ids=torch.tensor([[len(word) % 9 for word in text.split(" ")]]))

    (tmp_path / "eval.txt").write_text(" ".join("ab" * (i % 5) for i in range(70)))
    table = torch.randn(9, 9, generator=torch.Generator().manual_seed(2))
    config = PerplexityConfig(dataset="c4", path=str(tmp_path / "eval.txt"), seqlen=16, windows=3)
    result = PerplexityEvaluator(config).evaluate(TableLM(table), Tok())
    tokens = Tok()(" ".join("ab" * (i % 5) for i in range(70)), return_tensors="pt").input_ids[0].tolist()
    assert result.metrics["ppl_c4"] == pytest.approx(ppl_by_hand(table, tokens, 16, 3), rel=1e-6)
    assert set(result.metrics) == {f"ppl_c4{s}" for s in ("", "_stderr", "_ci_low", "_ci_high", "_n", "_tokens")}
    assert (result.metrics["ppl_c4_n"], result.metrics["ppl_c4_tokens"]) == (3, 48)
    assert result.metrics["ppl_c4_ci_low"] <= result.metrics["ppl_c4"] <= result.metrics["ppl_c4_ci_high"]
    p = result.protocol
    assert (p["seqlen"], p["windows"], p["windows_available"], p["tokens"]) == (16, 3, 4, 48)
    assert (p["split"], p["join"], p["dtype"]) == ("validation", " ", "float32")
    with pytest.raises(ConfigError, match="exceeds"):
        PerplexityEvaluator(PerplexityConfig(path=str(tmp_path / "eval.txt"), seqlen=65)).evaluate(TableLM(table),
                                                                                                  Tok())
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(TableLM(table), torch.zeros(1, 5, dtype=torch.long), 8, progress=False)


# Metrics under which every gate passes; each case below breaks exactly one gate.
# Point-estimate ratio gates (the interval ones: tests/test_gates_paired.py). beat_champion is always paired:
# the champion's windows are the candidate's, each 0.01 nats worse (so the candidate is better on every window).
GATES = GateSpec(max_ppl_ratio=1.25, min_zeroshot_ratio=0.9, min_sparsity=0.5, beat_champion="ppl_wikitext2",
                 bound="point")
DENSE = {"ppl_wikitext2": 20.0, "zeroshot_mean": 0.50}
GOOD = {"ppl_wikitext2": 25.0, "zeroshot_mean": 0.45, "sparsity_total": 0.5 - SPARSITY_ROUNDING}
CHAMPION = {"ppl_wikitext2": 25.5}
WINDOWS = [3.1, 3.4, 2.9, 3.3, 3.0, 3.5, 3.2, 2.8]


def nll_examples(shift: float) -> dict:
    return {"ppl_wikitext2": {"kind": "nll", "ids": list(range(8)), "values": [v + shift for v in WINDOWS],
                              "digest": "same-windows"}}


@pytest.mark.parametrize("change,failing", [
    ({}, set()),
    ({"ppl_wikitext2": 25.01}, {"max_ppl_ratio"}),
    ({"zeroshot_mean": 0.4499}, {"min_zeroshot_ratio"}),
    ({"sparsity_total": 0.5 - SPARSITY_ROUNDING - 1e-4}, {"min_sparsity"}),
    ({"champion": -0.01}, {"beat_champion"}),
    ({"zeroshot_mean": None}, {"min_zeroshot_ratio"}),
    ({"sparsity_total": None}, {"min_sparsity"}),
])
def test_promotion_needs_every_gate_to_pass(change, failing):
    metrics, change = dict(GOOD), dict(change)
    champion_shift = change.pop("champion", 0.01)
    for key, value in change.items():
        if value is None:
            metrics.pop(key)
        else:
            metrics[key] = value
    gates = evaluate_gates(GATES, metrics, DENSE, 0.9, CHAMPION, examples=nll_examples(0.0),
                           champion_examples=nll_examples(champion_shift))
    assert [g.name for g in gates] == ["max_ppl_ratio", "min_zeroshot_ratio", "min_sparsity", "beat_champion"]
    assert {g.name for g in gates if not g.passed} == failing
    # The decision flows/compress.py takes: promote only when all gates pass.
    assert all(g.passed for g in gates) == (not failing)


def test_gates_fail_closed_and_default_floor_is_the_target():
    assert [g.passed for g in evaluate_gates(GateSpec(), {"sparsity_total": 0.6 - SPARSITY_ROUNDING}, {}, 0.6)] == [
        True]
    assert [g.passed for g in evaluate_gates(GateSpec(), {"sparsity_total": 0.5949}, {}, 0.6)] == [False]
    none = evaluate_gates(GATES, {"sparsity_total": 0.5}, {}, 0.5, None)
    assert {g.name: g.passed for g in none} == {"max_ppl_ratio": False, "min_zeroshot_ratio": False,
                                               "min_sparsity": True, "beat_champion": False}
    same = {"zeroshot_boolq_acc": {"kind": "correct", "ids": [0, 1, 2], "values": [1, 0, 1], "digest": "d"},
            "zeroshot_mean": {"kind": "mean_of", "parts": ["zeroshot_boolq_acc"]}}
    first = evaluate_gates(GateSpec(beat_champion="zeroshot_mean", lower_is_better=False),
                           {"sparsity_total": 0.5, "zeroshot_mean": 0.4}, {}, 0.5, {"zeroshot_mean": 0.4},
                           examples=same, champion_examples=same)
    assert [g.passed for g in first] == [True, False]  # equal is not better
    zero_dense = evaluate_gates(GateSpec(min_zeroshot_ratio=0.5), GOOD, {"zeroshot_mean": 0.0}, 0.5)
    assert not zero_dense[0].passed
    assert "25.000, dense 20.000: 1.250x dense (limit <= 1.25x)" in evaluate_gates(GATES, GOOD, DENSE, 0.5)[0].detail


class WordTokenizer:
    """A tiny tokenizer: one id per whitespace-separated word (its length)."""

    def __call__(self, text, return_tensors=None):
        assert return_tensors == "pt"
        return SimpleNamespace(input_ids=torch.tensor([[len(w) for w in text.split()]]))


def sampler_by_hand(docs, tokenizer, nsamples, seqlen, seed):
    """The reference get_c4 loop, written out."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tokenizer(docs[i], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        start = random.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, start : start + seqlen])
    return torch.cat(out)


@pytest.mark.parametrize("seed,nsamples,seqlen", [(0, 5, 6), (3, 8, 10)])
def test_calibration_sampler_matches_the_reference_loop(seed, nsamples, seqlen):
    rng = random.Random(99)
    docs = [" ".join("x" * rng.randint(1, 9) for _ in range(rng.randint(2, 25))) for _ in range(30)]
    got = sample_windows(docs, WordTokenizer(), nsamples, seqlen, seed)
    assert torch.equal(got, sampler_by_hand(docs, WordTokenizer(), nsamples, seqlen, seed))
    assert got.shape == (nsamples, seqlen)


def test_calibration_sampler_refuses_what_it_cannot_sample():
    with pytest.raises(DataError, match=r"longer than seqlen=5 tokens \(longest: 5\)\. Lower `seqlen` or use a"):
        sample_windows(["a b c", "a b c d e", "a"], WordTokenizer(), 2, 5, 0)
    with pytest.raises(DataError, match="^calibration data is empty: the source has no documents with text$"):
        sample_windows(["", "  "], WordTokenizer(), 2, 5, 0)
    for n, s in [(0, 4), (2, 0)]:
        with pytest.raises(ConfigError, match="must be positive"):
            sample_windows(["a b c d e f"], WordTokenizer(), n, s, 0)
    assert sample_windows(["a bb ccc dddd e ff"], WordTokenizer(), 3, 5, 1).shape == (3, 5)
    assert sample_windows(["a bb"], WordTokenizer(), 1, 1, 0).shape == (1, 1)  # one sample of one token is valid
