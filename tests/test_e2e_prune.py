"""The real SmolLM2-135M, pruned and evaluated end to end (few windows, CPU)."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import needs_data
from wanda_pipeline.data import calibration_windows, wikitext2_test_tokens
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.evaluators.perplexity import perplexity
from wanda_pipeline.evaluators.sparsity_report import sparsity_table
from wanda_pipeline.models import load_model
from wanda_pipeline.pruners.magnitude import MagnitudePruner
from wanda_pipeline.pruners.wanda import WandaPruner
from wanda_pipeline.pruning import prune_model

pytestmark = [pytest.mark.slow]
SEQLEN, WINDOWS = 256, 6


def ppl_of(model, tokenizer):
    return perplexity(model, wikitext2_test_tokens(tokenizer), SEQLEN, WINDOWS, progress=False)[0]


@needs_data
def test_paper_ordering_dense_wanda_magnitude(smollm2_dir):
    results = {}
    for method in ["dense", "wanda", "magnitude"]:
        model, tok, _ = load_model(str(smollm2_dir))
        emb = model.get_input_embeddings().weight.clone()
        if method != "dense":
            pruner = WandaPruner() if method == "wanda" else MagnitudePruner()
            windows = calibration_windows("c4", tok, 8, SEQLEN, 0)
            prune_model(model, windows.tokens, pruner, LayerEngine(progress=False))
            rows = sparsity_table(model)
            assert len(rows) == 30 * 7
            for r in rows:  # every pruned linear is exactly half zero
                assert r["zeros"] == r["numel"] // 2, r
            assert torch.equal(model.get_input_embeddings().weight, emb)  # embeddings / tied lm_head untouched
        results[method] = ppl_of(model, tok)
    assert results["dense"] < results["wanda"] < results["magnitude"], results


@needs_data
def test_cli_prune_2_4_saves_a_reloadable_model(tmp_path, smollm2_dir):
    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "wanda_pipeline.cli", "prune", "--model", "smollm2-135m", "--nsamples", "4",
         "--seqlen", "128", "--sparsity_type", "2:4", "--eval-windows", "2", "--save", str(tmp_path / "log"),
         "--save_model", str(out)],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sparsity sanity check 0.5000" in proc.stdout
    ppl_line = next(line for line in proc.stdout.splitlines() if line.startswith("wikitext perplexity"))
    reported = float(ppl_line.split()[2])
    assert (tmp_path / "log" / "log_wanda.txt").exists()
    model, tok, _ = load_model(str(out))
    for r in sparsity_table(model):  # the dequantised model has a few native zeros among kept weights
        assert r["numel"] // 2 <= r["zeros"] < r["numel"] * 0.501
    for block in model.model.layers:
        w = block.mlp.down_proj.weight
        assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    again = perplexity(model, wikitext2_test_tokens(tok), 128, 2, progress=False)[0]
    assert again == pytest.approx(reported, rel=1e-4)


def test_bad_flags_exit_with_config_code():
    proc = subprocess.run([sys.executable, "-m", "wanda_pipeline.cli", "prune", "--sparsity_ratio", "1.2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "must be in [0, 1)" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "wanda_pipeline.cli", "prune", "--model", "/no/such/model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4 and "/no/such/model" in proc.stderr
