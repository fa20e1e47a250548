"""Pins on the pruning core as wired up, against loops written out here. Fast, no data, no SmolLM2.

Each test names the breakage it was seen to catch (see bench/results/mutation.md).
"""

import pytest
import torch

from wanda_pipeline import stages
from wanda_pipeline.allocation import AllocationConfig
from wanda_pipeline.config import EngineSpec
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.evaluators.sparsity_report import SparsityEvaluator, sparsity_table, summarize
from wanda_pipeline.models import find_blocks, find_linears
from wanda_pipeline.pruners.magnitude import MagnitudeConfig, MagnitudePruner
from wanda_pipeline.pruners.sparsegpt import SparseGPTConfig, SparseGPTPruner
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.quantizers.rtn import RTNConfig, RTNQuantizer
from wanda_pipeline.tiny_models import tiny_model


def lowest_k_per_row(score: list[list[float]], k: int) -> torch.Tensor:
    """Plain Python: in each row, the k lowest scores (ties to the lower column)."""
    mask = torch.zeros(len(score), len(score[0]), dtype=torch.bool)
    for r, row in enumerate(score):
        for c in sorted(range(len(row)), key=lambda j: (row[j], j))[:k]:
            mask[r, c] = True
    return mask


# |W| grows along each row while the activation norm falls faster, so |W| * ||X|| reverses the ranking.
W_FIXED = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0],
                        [-8.0, 7.0, -6.0, 5.0, -4.0, 3.0, -2.0, 1.5],
                        [0.5, 1.0, -1.5, 2.0, -2.5, 3.0, -3.5, 4.0]])
NORM_FIXED = torch.tensor([64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0, 0.5])  # ||X_j||; the stat holds its square


def wanda_score_by_hand(w: torch.Tensor, norm: torch.Tensor) -> list[list[float]]:
    return [[abs(float(w[r, c])) * float(norm[c]) for c in range(w.shape[1])] for r in range(w.shape[0])]


def test_wanda_pruner_scores_weight_times_activation_norm_per_row():
    stats = {"col_sq_norm": NORM_FIXED**2}
    weight = W_FIXED.clone()
    mask = WandaPruner().prune(weight, stats, 0.5)  # default config, as the pipeline builds it
    expected = lowest_k_per_row(wanda_score_by_hand(W_FIXED, NORM_FIXED), 4)
    assert torch.equal(mask, expected)
    assert mask.sum(1).tolist() == [4, 4, 4]
    assert torch.equal(weight, W_FIXED)  # Wanda returns the mask and leaves the weight alone
    magnitude = MagnitudePruner(MagnitudeConfig(group="output")).prune(W_FIXED.clone(), {}, 0.5)
    assert torch.equal(magnitude, lowest_k_per_row(W_FIXED.abs().tolist(), 4))
    assert not torch.equal(mask, magnitude)
    assert mask[0].tolist() == [False, False, False, False, True, True, True, True]  # the reversal itself


@pytest.mark.parametrize("s", [0.25, 0.6])
def test_wanda_pruner_matches_the_loop_on_random_inputs(s):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 20, generator=g)
    w[0] *= 50  # a per-layer comparison would prune row 0 much less than the others
    x = torch.randn(30, 20, generator=g) * torch.rand(20, generator=g) * 4
    stats = {"col_sq_norm": (x * x).sum(0) / 30}  # the engine's statistic: mean over samples of ||x_j||^2
    mask = WandaPruner(WandaConfig(sparsity=s)).prune(w.clone(), stats, s)
    expected = lowest_k_per_row(wanda_score_by_hand(w, x.norm(dim=0) / 30**0.5), int(20 * s))
    assert torch.equal(mask, expected)
    assert WandaConfig().group == "output"
    layer = WandaPruner(WandaConfig(group="layer")).prune(w.clone(), stats, s)
    assert int(layer.sum()) == int(w.numel() * s) and int(layer[0].sum()) < int(20 * s)


def sparsegpt_by_hand(w: torch.Tensor, gram: torch.Tensor, s: float, nm, blocksize: int, percdamp: float = 0.01):
    """SparseGPT one column at a time (no lazy batching): every column's error is pushed into all
    later columns at once. The mask of each block of ``blocksize`` columns is chosen when the block
    starts (N:M: when each group of M starts), from w^2 / diag(H^-1 chol)^2 of the updated weights."""
    w = w.double().clone()
    h = gram.double() + percdamp * gram.diag().double().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).T  # upper factor of H^-1
    rows, cols = w.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        d = u.diag()
        if nm is None:
            score = (w[:, b0:b1] ** 2 / d[b0:b1] ** 2).flatten().tolist()
            k = int(rows * b1 * s) - int(rows * b0 * s)
            for flat in sorted(range(len(score)), key=lambda j: (score[j], j))[:k]:
                mask[flat // (b1 - b0), b0 + flat % (b1 - b0)] = True
        for i in range(b0, b1):
            if nm is not None and (i - b0) % nm[1] == 0:
                score = (w[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]] ** 2).tolist()
                mask[:, i : i + nm[1]] = lowest_k_per_row(score, nm[0])
            err = w[:, i] * mask[:, i] / u[i, i]  # only the pruned weights change: q = 0 there
            w[:, i:] -= err.unsqueeze(1) * u[i, i:].unsqueeze(0)
    w[mask] = 0
    return w.float(), mask


@pytest.mark.parametrize("pattern,nm", [("unstructured", None), ("2:4", (2, 4))])
def test_sparsegpt_matches_the_update_written_out(pattern, nm):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 12, generator=g) * torch.linspace(0.2, 3, 12)  # uneven diag(H^-1) within each group
    x = x @ (torch.eye(12) + 0.3 * torch.randn(12, 12, generator=g))
    gram = 2 / 64 * x.T @ x
    w = torch.randn(5, 12, generator=g)
    weight = w.clone()
    pruner = SparseGPTPruner(SparseGPTConfig(sparsity=0.5, pattern=pattern, blocksize=4, percdamp=0.01))
    mask = pruner.prune(weight, {"gram": gram}, 0.5)
    expected_w, expected_mask = sparsegpt_by_hand(w, gram, 0.5, nm, blocksize=4)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(weight, expected_w, rtol=1e-4, atol=1e-5)
    assert int(mask.sum()) == 30 and pruner.counters == {"hessian_fallbacks": 0, "linears": 1}
    # Kept weights moved: the update is there (a no-update SparseGPT would leave them alone).
    assert not torch.allclose(weight[~mask], w[~mask])


def test_sparsegpt_dead_inputs_are_zeroed_and_do_not_break_the_factor():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 8, generator=g)
    x[:, 3] = 0  # an input column that never fires
    gram = 2 / 40 * x.T @ x
    weight = torch.randn(4, 8, generator=g)
    pruner = SparseGPTPruner(SparseGPTConfig(sparsity=0.25, blocksize=4))
    mask = pruner.prune(weight, {"gram": gram}, 0.25)
    assert bool((weight[:, 3] == 0).all()) and pruner.counters["hessian_fallbacks"] == 0
    assert int(mask.sum()) == 8 and torch.isfinite(weight).all()


def set_zeros_by_hand(model) -> tuple[int, int, list[float]]:
    """Zero a different fraction of each linear; return (zeros, numel, per-layer fractions)."""
    _, blocks = find_blocks(model)
    zeros = numel = 0
    fractions = []
    for b, block in enumerate(blocks):
        for i, lin in enumerate(find_linears(block).values()):
            w = lin.weight.data.view(-1)
            k = (b * 7 + i * 5) % 11 * w.numel() // 12
            w[:k] = 0.0
            w[k:][w[k:] == 0] = 1.0  # no accidental zeros
            zeros, numel = zeros + k, numel + w.numel()
            fractions.append(k / w.numel())
    return zeros, numel, fractions


def test_total_sparsity_weights_each_layer_by_its_size():
    model = tiny_model("llama", seed=0, layers=2)
    zeros, numel, fractions = set_zeros_by_hand(model)
    metrics = SparsityEvaluator().evaluate(model, None).metrics
    assert metrics["sparsity_total"] == pytest.approx(zeros / numel)
    assert abs(zeros / numel - sum(fractions) / len(fractions)) > 0.01  # the unweighted mean is wrong here
    rows = sparsity_table(model)
    for b in (0, 1):
        mine = [r for r in rows if r["block"] == b]
        assert metrics[f"sparsity_block_{b:03d}"] == pytest.approx(
            sum(r["zeros"] for r in mine) / sum(r["numel"] for r in mine))
    assert [r["sparsity"] for r in rows] == pytest.approx(fractions)


def test_per_block_allocation_prunes_exact_per_row_counts(tokens_gen):
    model = tiny_model("llama", seed=0, layers=2)
    out = prune_model(model, tokens_gen(128, 2, 16), WandaPruner(WandaConfig(sparsity=0.5)),
                      LayerEngine(progress=False), AllocationConfig(method="per_layer", ratios={0: 0.25}))
    assert out.block_ratios == [0.25, 0.5]
    expected_zeros = sum(lin.weight.shape[0] * int(lin.weight.shape[1] * ratio)
                         for ratio, block in zip(out.block_ratios, find_blocks(model)[1], strict=True)
                         for lin in find_linears(block).values())
    numel = sum(lin.weight.numel() for block in find_blocks(model)[1] for lin in find_linears(block).values())
    assert summarize(sparsity_table(model))["sparsity_total"] == pytest.approx(expected_zeros / numel)


def rtn_sym_by_hand(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    out = torch.empty_like(w)
    qmax = 2 ** (bits - 1) - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            grp = w[r, c0 : c0 + group]
            scale = grp.abs().max() / qmax
            scale = scale if scale > 0 else torch.ones(())
            out[r, c0 : c0 + group] = torch.clamp(torch.round(grp / scale), -qmax - 1, qmax) * scale
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_stage_writes_the_quantized_weights_back(bits):
    model = tiny_model("llama", seed=1, layers=1)
    _, blocks = find_blocks(model)
    before = {}
    for name, lin in find_linears(blocks[0]).items():
        w = lin.weight.data
        w *= torch.tensor([10.0 ** (c // 8 % 4) for c in range(w.shape[1])])  # groups of 8 differ 10x-1000x
        w[:, 1::3] = 0.0  # pruned weights
        before[name] = w.clone()
    report = stages.quantize(model, RTNQuantizer(RTNConfig(bits=bits, group_size=8)), EngineSpec())
    for name, lin in find_linears(blocks[0]).items():
        got, orig = lin.weight.data, before[name]
        torch.testing.assert_close(got, rtn_sym_by_hand(orig, bits, 8))
        assert not torch.equal(got, orig)  # it changed, i.e. it was written back
        assert bool((got[orig == 0] == 0).all())
        # Each group of 8 has its own scale: its largest weight is on the grid exactly.
        g_got = got.abs().reshape(got.shape[0], -1, 8).amax(-1)
        g_orig = orig.abs().reshape(orig.shape[0], -1, 8).amax(-1)
        torch.testing.assert_close(g_got, g_orig)
    assert report.quantized_linears == 7 and report.zeros_after >= report.zeros_before > 0
