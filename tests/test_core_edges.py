"""Edges of the core that mutation testing found unpinned: evaluation text, reports, gate
details, pruner guards. Fast, no data (a fake data folder is written under tmp_path)."""

import json
from types import SimpleNamespace

import pytest
import torch

from tests.test_core_pins import sparsegpt_by_hand
from wanda_pipeline.config import GateSpec
from wanda_pipeline.errors import ConfigError, DataError
from wanda_pipeline.evaluators.perplexity import PerplexityConfig, PerplexityEvaluator, eval_tokens
from wanda_pipeline.evaluators.sparsity_report import SparsityConfig, SparsityEvaluator, summarize
from wanda_pipeline.pruners.magnitude import MagnitudePruner
from wanda_pipeline.pruners.sparsegpt import SparseGPTConfig, SparseGPTPruner, sparsegpt_prune
from wanda_pipeline.sparsity import (
    parse_pattern,
    pattern_sparsity,
    per_layer_mask,
    per_row_mask,
    respects_nm,
    select_mask,
    wanda_metric,
    zero_fraction,
)
from wanda_pipeline.tiny_models import tiny_model
from wanda_pipeline.tracking.gates import GateResult, evaluate_gates


class IntTokenizer:
    """Each whitespace-separated word is an integer id. Insists on PyTorch tensors, like the callers need."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, text, return_tensors=None):
        assert return_tensors == "pt"
        self.seen.append(text)
        return SimpleNamespace(input_ids=torch.tensor([[int(w) for w in text.split()]]))


def test_eval_tokens_follow_the_reference_protocol(tmp_path, monkeypatch):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4-validation.sample2000.jsonl").write_text(
        "".join(json.dumps({"text": str(i)}) + "\n" for i in range(1200)))
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    (tmp_path / "wikitext-2-raw-v1" / "test.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in [" 1 2", " 3", ""]))
    monkeypatch.setenv("WANDA_DATA_DIR", str(tmp_path))
    # C4: the first 1100 validation documents joined by spaces, cut to 256 windows.
    assert torch.equal(eval_tokens("c4", IntTokenizer(), 4), torch.arange(1024).reshape(1, -1))
    assert torch.equal(eval_tokens("c4", IntTokenizer(), 5), torch.arange(1100).reshape(1, -1))
    tok = IntTokenizer()
    assert eval_tokens("wikitext2", tok, 4).tolist() == [[1, 2, 3]]
    assert tok.seen == [" 1 2\n\n 3\n\n"]  # rows joined by blank lines, once
    (tmp_path / "own.txt").write_text(" 5 6\n 7\n")
    tok = IntTokenizer()
    assert eval_tokens("wikitext2", tok, 4, str(tmp_path / "own.txt")).tolist() == [[5, 6, 7]]
    assert tok.seen == [" 5 6\n\n 7\n\n"]  # a text file's lines are the rows


def test_perplexity_evaluator_protocol_for_both_datasets(tmp_path):
    from tests.test_core_pins_eval import TableLM

    (tmp_path / "w.txt").write_text("\n".join(" ".join(str(i % 7) for i in range(r, r + 9)) for r in range(8)))
    model = TableLM(torch.randn(7, 7, generator=torch.Generator().manual_seed(3)), max_positions=32)
    wiki = PerplexityEvaluator(PerplexityConfig(path=str(tmp_path / "w.txt"), seqlen=10, windows=2, batch_size=2))
    result = wiki.evaluate(model, IntTokenizer())
    assert set(result.metrics) == {f"ppl_wikitext2{s}" for s in ("", "_stderr", "_ci_low", "_ci_high", "_n", "_tokens")}
    assert result.protocol == {"dataset": str(tmp_path / "w.txt"), "split": "test", "seqlen": 10, "windows": 2,
                               "windows_available": 7, "tokens": 20, "dtype": "float32", "join": "\\n\\n",
                               "interval": "95% bootstrap over windows, 2000 resamples, seed 0"}
    assert len(result.examples["ppl_wikitext2"]["values"]) == 2  # batch_size 2: one value per window
    assert PerplexityEvaluator().config.dataset == "wikitext2"
    with pytest.raises(DataError, match="does not exist; check the evaluator's `path`"):
        PerplexityEvaluator(PerplexityConfig(path=str(tmp_path / "none.txt"))).evaluate(model, IntTokenizer())


def test_sparsity_report_filters_and_names_rows():
    model = tiny_model("llama", seed=0, layers=2)
    model.model.layers[1].mlp.down_proj.weight.data[:, :16] = 0
    only_mlp = SparsityEvaluator(SparsityConfig(include=r"mlp\.")).evaluate(model, None)
    rows = only_mlp.tables["sparsity_per_layer"]
    assert [(r["block"], r["linear"]) for r in rows] == [(b, f"mlp.{n}_proj") for b in (0, 1) for n in
                                                         ("gate", "up", "down")]
    assert only_mlp.metrics["sparsity_total"] == pytest.approx(16 * 32 / (6 * 64 * 32))
    no_down = SparsityEvaluator(SparsityConfig(exclude="down_proj")).evaluate(model, None)
    assert no_down.metrics["sparsity_total"] == 0.0 and len(no_down.tables["sparsity_per_layer"]) == 12
    assert only_mlp.protocol == {"scope": "linears in decoder blocks"}
    assert summarize([]) == {"sparsity_total": 0.0}


def test_gate_details_say_what_was_measured():
    gates = GateSpec(max_ppl_ratio=1.3, min_zeroshot_ratio=0.95, min_sparsity=0.45, beat_champion="ppl_wikitext2",
                     bound="point")
    metrics = {"ppl_wikitext2": 26.0, "zeroshot_mean": 0.5, "sparsity_total": 0.5}
    got = evaluate_gates(gates, metrics, {"ppl_wikitext2": 20.0, "zeroshot_mean": 0.52}, 0.5, None)
    none = "no interval: no per-example results for both the pruned and the dense model"
    assert [(g.name, g.passed, g.detail, g.test) for g in got] == [
        ("max_ppl_ratio", True, f"ppl_wikitext2 26.000, dense 20.000: 1.300x dense (limit <= 1.3x); {none}", "point"),
        ("min_zeroshot_ratio", True, f"zero-shot mean 0.5000, dense 0.5200: 0.962x dense (limit >= 0.95x); {none}",
         "point"),
        ("min_sparsity", True, "sparsity 0.5000 (minimum 0.4500, less 0.005 for rounding)", "exact count"),
        ("beat_champion", True, "no current champion; the first one with 'ppl_wikitext2' wins", ""),
    ]
    missing = evaluate_gates(gates, {"ppl_c4": 3.0}, {"ppl_c4": 3.0}, 0.5, {})
    assert [(g.name, g.passed, g.detail) for g in missing] == [
        ("max_ppl_ratio", True, f"ppl_c4 3.000, dense 3.000: 1.000x dense (limit <= 1.3x); {none}"),
        ("min_zeroshot_ratio", False, "no zero-shot mean for both models"),
        ("min_sparsity", False, "no sparsity measured (add the 'sparsity' evaluator)"),
        ("beat_champion", False, "metric 'ppl_wikitext2' was not measured"),
    ]
    no_dense = evaluate_gates(GateSpec(max_ppl_ratio=2.0, beat_champion="ppl_c4"),
                              {"ppl_c4": 3.0, "sparsity_total": 0.5}, {}, 0.5, {"ppl_c4": 1.0})
    assert [(g.passed, g.detail) for g in no_dense] == [
        (False, "no perplexity for both the pruned and the dense model"),
        (True, "sparsity 0.5000 (minimum 0.5000, less 0.005 for rounding)"),
        (False, "the champion has no per-example results for 'ppl_c4' (a run from before they were kept?), so no "
                "paired test is possible; promote by hand with `wanda-pipeline promote` if you mean to"),
    ]
    assert GateResult("a", True, "b").as_dict() == {"name": "a", "passed": True, "detail": "b", "test": "",
                                                    "interval": "", "outcome": ""}


def test_sparsity_helpers_at_their_edges():
    metric = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
    assert not per_row_mask(metric, 0.0).any() and not per_layer_mask(metric, 0.0).any()
    assert torch.equal(select_mask(metric, 0.5), per_row_mask(metric, 0.5))  # default: unstructured, per row
    with pytest.raises(ConfigError, match=r"unknown comparison group 'rows'; use 'output' or 'layer'"):
        select_mask(metric, 0.5, "unstructured", "rows")
    with pytest.raises(ConfigError, match=r"N:M sparsity needs 0 < N < M, got 4:2"):
        parse_pattern("4:2")
    with pytest.raises(ConfigError, match=r"unknown sparsity pattern 'x'; use 'unstructured' or 'N:M'"):
        parse_pattern("x")
    assert pattern_sparsity("2:4", 0.7) == 0.5 and pattern_sparsity("unstructured", 0.7) == 0.7
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0], [4.0, 0.0, 0.0, 5.0, 6.0]])
    assert zero_fraction(w) == 0.4
    assert respects_nm(w, 2, 4) and not respects_nm(w, 3, 4)
    assert respects_nm(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), 2, 4)  # more zeros than needed is fine
    half = wanda_metric(torch.ones(2, 3, dtype=torch.float16), torch.tensor([1.0, 4.0, 9.0]))
    assert half.dtype == torch.float16 and half.tolist() == [[1.0, 2.0, 3.0]] * 2


def test_sparsegpt_guards_defaults_and_counters():
    with pytest.raises(ValueError, match="blocksize 6 must be a multiple of M=4"):
        SparseGPTPruner(SparseGPTConfig(pattern="2:4", blocksize=6)).prune(torch.ones(2, 8), {"gram": torch.eye(8)},
                                                                           0.5)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 130, generator=g) * torch.linspace(0.2, 3, 130)
    gram, w = 2 / 300 * x.T @ x, torch.randn(3, 130, generator=g)
    a, b = w.clone(), w.clone()
    mask_a, used = sparsegpt_prune(a, gram, 0.5, None)  # the function's defaults are the config's
    pruner = SparseGPTPruner(SparseGPTConfig(blocksize=3))  # odd blocks are fine when unstructured
    assert torch.equal(mask_a, SparseGPTPruner().prune(b, {"gram": gram}, 0.5)) and torch.equal(a, b) and used == 0
    pruner.prune(w.clone(), {"gram": gram}, 0.5)
    bad = SparseGPTPruner(SparseGPTConfig(max_damp_retries=1))
    for _ in range(2):
        bad.prune(torch.ones(2, 4), {"gram": -torch.eye(4)}, 0.5)
    assert bad.counters == {"hessian_fallbacks": 4, "linears": 2}
    assert sparsegpt_prune(torch.ones(2, 4), -torch.eye(4), 0.5, None)[1] == 5  # default: 4 retries
    assert int(MagnitudePruner().prune(w, {}, 0.5).sum(1).max()) > 65  # default magnitude compares per layer


def test_sparsegpt_with_a_dead_input_matches_the_written_out_update():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(80, 8, generator=g) * torch.linspace(0.3, 3, 8)
    x[:, 2] = 0
    gram, w = 2 / 80 * x.T @ x, torch.randn(4, 8, generator=g)
    fixed = gram.clone()
    fixed[2, 2] = 1.0  # the dead input gets a unit diagonal, and its weights are dropped first
    start = w.clone()
    start[:, 2] = 0
    weight = w.clone()
    # Strong dampening, so the dead input's diagonal (part of the mean) visibly matters.
    mask = SparseGPTPruner(SparseGPTConfig(sparsity=0.5, blocksize=4, percdamp=0.5)).prune(weight, {"gram": gram}, 0.5)
    expected_w, expected_mask = sparsegpt_by_hand(start, fixed, 0.5, None, blocksize=4, percdamp=0.5)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(weight, expected_w, rtol=1e-4, atol=1e-5)
