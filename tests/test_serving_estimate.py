"""Before a long CPU stage, the CLI says what it will cost: tokens x blocks x FLOPs per token."""

import pytest

from wanda_pipeline import estimate
from wanda_pipeline.cli import main
from wanda_pipeline.tiny_models import tiny_model

# tiny LLaMA (hidden 32, 4 heads of 8, 2 KV heads, MLP 64): weights of one block, counted by hand
BLOCK = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32  # q, o; k, v; gate, up, down; two norms
HEAD = 128 * 32  # lm_head, vocab 128


@pytest.mark.parametrize("passes", [1, 2])
def test_prune_cost_is_tokens_times_blocks_times_flops(passes, monkeypatch):
    monkeypatch.setattr(estimate, "_rate", 1e9)
    est = estimate.prune_cost(tiny_model("llama", layers=2), nsamples=4, seqlen=64, passes=passes)
    per_token_block = 2 * BLOCK + 4 * 64 * 32  # linears, then QK^T and AV
    assert (est.tokens, est.blocks, est.forwards) == (256, 2, passes)
    assert est.flops == passes * 256 * 2 * per_token_block
    assert est.seconds == pytest.approx(est.flops / (1e9 * estimate.EFFICIENCY))
    assert "256 tokens x 2 blocks x" in est.line() and "calibration 4 x 64" in est.line()


def test_perplexity_cost_counts_the_head_and_all_windows(monkeypatch):
    monkeypatch.setattr(estimate, "_rate", 1e9)
    model = tiny_model("llama", layers=3)
    est = estimate.perplexity_cost(model, seqlen=128, windows=5)
    assert est.flops == 5 * 128 * (2 * (3 * BLOCK + HEAD) + 3 * 4 * 128 * 32)
    assert estimate.perplexity_cost(model, 128, None).tokens == estimate.WIKITEXT2_TEST_TOKENS
    assert estimate.perplexity_cost(model, 128, 5, device="cuda") is None  # CPU only
    assert estimate._human(45) == "45 s" and estimate._human(1500) == "25 min" and estimate._human(7200) == "2.0 h"


def test_rate_is_measured_and_positive():
    estimate._rate = None
    assert 1e6 < estimate.matmul_rate() < 1e14


def test_prune_cli_prints_the_estimate_before_the_stage(tmp_path, tiny_dir, capsys, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some calibration text about pruning models" for i in range(400)))
    args = ["prune", "--model", str(tiny_dir), "--calibration", str(text), "--nsamples", "2", "--seqlen", "32",
            "--eval-windows", "2", "--eval-seqlen", "32", "--eval-path", str(text)]
    assert main(args) == 0
    assert "[estimate]" not in capsys.readouterr().err  # a few seconds: not worth a line
    monkeypatch.setattr(estimate, "MIN_SECONDS", 0.0)
    assert main(args) == 0
    err = capsys.readouterr().err
    prune_at, evaluate_at = err.index("[stage] prune"), err.index("[stage] evaluate\n")
    assert "[estimate] prune: calibration 2 x 32 -> 64 tokens x 2 blocks x 2 forward(s)" in err[prune_at:evaluate_at]
    assert "[estimate] evaluate: perplexity 2 x 32 -> 64 tokens" in err[evaluate_at:]
