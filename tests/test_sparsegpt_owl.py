"""SparseGPT against Wanda on reconstruction error; OWL allocation."""

import pytest
import torch

from wanda_pipeline.allocation import AllocationConfig, outlier_ratio, owl_ratios
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.evaluators.sparsity_report import sparsity_table
from wanda_pipeline.pruners.sparsegpt import SparseGPTConfig, SparseGPTPruner, sparsegpt_prune
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.sparsity import apply_mask, respects_nm
from wanda_pipeline.tiny_models import tiny_model


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) * torch.linspace(0.2, 3, d)) @ mix


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_on_layer_reconstruction(pattern):
    X = correlated_inputs(512, 64)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    stats = {"col_sq_norm": (X * X).sum(0) / X.shape[0], "gram": 2 / X.shape[0] * X.T @ X}

    wanda_w = W.clone()
    apply_mask(wanda_w, WandaPruner(WandaConfig(sparsity=0.5, pattern=pattern)).prune(wanda_w, stats, 0.5))
    sgpt_w = W.clone()
    pruner = SparseGPTPruner(SparseGPTConfig(sparsity=0.5, pattern=pattern, blocksize=16))
    mask = pruner.prune(sgpt_w, stats, 0.5)

    def err(w):  # ||X W^T - X W'^T||_F^2, the layer-output reconstruction error
        return float(((X @ W.T - X @ w.T) ** 2).sum())

    assert int(mask.sum()) == W.numel() // 2 and bool((sgpt_w[mask] == 0).all())
    assert err(sgpt_w) < 0.9 * err(wanda_w), (err(sgpt_w), err(wanda_w))
    if pattern == "2:4":
        assert respects_nm(sgpt_w, 2, 4)
    assert pruner.counters["hessian_fallbacks"] == 0


def test_singular_hessian_fallback_is_counted():
    W = torch.randn(8, 16)
    gram = -torch.eye(16)  # not positive definite, at any dampening
    mask, fallbacks = sparsegpt_prune(W, gram, 0.5, None, retries=2)
    assert fallbacks == 3 and int(mask.sum()) == 64


def test_sparsegpt_in_the_engine_reports_counters(tokens_gen):
    model = tiny_model("llama", seed=0)
    out = prune_model(model, tokens_gen(128, 4, 16), SparseGPTPruner(SparseGPTConfig(sparsity=0.5, blocksize=16)),
                      LayerEngine(progress=False))
    assert out.counters == {"linears": 14, "hessian_fallbacks": 0}  # random tiny inputs: every Cholesky works
    assert all(abs(r["sparsity"] - 0.5) < 1e-6 for r in sparsity_table(model))


def test_owl_formula_written_out():
    lod = [0.01, 0.03, 0.02, 0.06]
    lam, target = 0.08, 0.6
    lo, hi = min(lod), max(lod)
    scaled = [(x - lo) / (hi - lo) * 2 * lam for x in lod]
    mean = sum(scaled) / len(scaled)
    expected = [1 - (s - mean + (1 - target)) for s in scaled]
    got = owl_ratios(lod, target, lam)
    assert got == pytest.approx(expected)
    assert sum(got) / len(got) == pytest.approx(target)
    assert got[3] == min(got)  # the block with most outliers keeps the most weights
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0])], 2.0) == 0.25  # mean 3, threshold 6


def test_owl_on_a_model_averages_to_target(tokens_gen):
    model = tiny_model("llama", seed=0, layers=4)
    alloc = AllocationConfig(method="owl", owl_m=3, owl_lambda=0.08)
    out = prune_model(model, tokens_gen(128, 4, 16), WandaPruner(WandaConfig(sparsity=0.6)),
                      LayerEngine(progress=False), alloc)
    assert len(out.block_ratios) == 4 and sum(out.block_ratios) / 4 == pytest.approx(0.6)
    assert max(out.block_ratios) - min(out.block_ratios) <= 2 * 0.08 + 1e-9
    by_block = {}
    for r in sparsity_table(model):
        by_block.setdefault(r["block"], []).append(r["sparsity"])
    for b, ratio in enumerate(out.block_ratios):
        assert all(abs(s - ratio) < 1 / 32 for s in by_block[b])


def test_explicit_per_layer_ratios(tokens_gen):
    model = tiny_model("llama", seed=0, layers=2)
    alloc = AllocationConfig(method="per_layer", ratios={0: 0.25, 1: 0.75})
    out = prune_model(model, tokens_gen(128, 2, 16), WandaPruner(WandaConfig(sparsity=0.5)),
                      LayerEngine(progress=False), alloc)
    assert out.block_ratios == [0.25, 0.75]
