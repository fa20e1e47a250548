"""Pins on the small kernels of the core (RTN, statistics, allocation, the Hessian factor, the
Wanda variant), each against a loop or formula written out here. Fast, no data."""

import math

import pytest
import torch

from wanda_pipeline.allocation import AllocationConfig, block_ratios, outlier_ratio, owl_ratios
from wanda_pipeline.errors import ConfigError, PluginError
from wanda_pipeline.pruners.sparsegpt import inverse_hessian_cholesky
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.quantizers.rtn import RTNConfig, RTNQuantizer
from wanda_pipeline.sparsity import nm_mask, variant_mask, wanda_metric
from wanda_pipeline.stats import ColumnSqNorm, Gram, make_accumulators


def rtn_by_hand(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Group by group along each row; the last group may be short. The scale is rounded to the
    weight's dtype (it is stored there) and the dequantised value is computed in that dtype."""
    out = torch.empty_like(w)
    w32 = w.float()
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            grp = w32[r, c0 : c0 + group]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                scale = (grp.abs().max() / qmax).to(w.dtype).float()
                scale = scale if scale > 0 else torch.ones(())
                q = torch.clamp(torch.round(grp / scale), -qmax - 1, qmax)
                out[r, c0 : c0 + group] = q.to(w.dtype) * scale.to(w.dtype)
            else:
                qmax = 2**bits - 1
                lo, hi = torch.clamp(grp.min(), max=0), torch.clamp(grp.max(), min=0)
                scale = ((hi - lo) / qmax).to(w.dtype).float()
                scale = scale if scale > 0 else torch.ones(())
                zero = torch.round(-lo / scale)
                q = torch.clamp(torch.round(grp / scale) + zero, 0, qmax)
                out[r, c0 : c0 + group] = (q - zero).to(w.dtype) * scale.to(w.dtype)
    return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_quantizer_with_a_short_last_group(bits, symmetric):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 21, generator=g) * torch.linspace(0.1, 4, 21)  # groups of 8, 8 and 5
    w[:, ::4] = 0
    w[3] = w[3].abs() + 0.1  # an all-positive row: the asymmetric range must still include 0
    w[4] = 0  # an all-zero row: scale falls back to 1, zeros stay zeros
    q = RTNQuantizer(RTNConfig(bits=bits, group_size=8, symmetric=symmetric))
    got = q.quantize_weight(w.clone())
    torch.testing.assert_close(got, rtn_by_hand(w, bits, 8, symmetric))
    assert got.dtype == w.dtype and bool((got[w == 0] == 0).all()) and not torch.equal(got, w)
    half = RTNQuantizer(RTNConfig(bits=bits, group_size=64, symmetric=symmetric)).quantize_weight(w.clone().half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), rtn_by_hand(w.half(), bits, 21, symmetric).float(), rtol=1e-3, atol=1e-3)


def test_rtn_asymmetric_clamp_binds_on_round_half_even():
    # scale 1, zero round(1.5) = 2; round(13.5) + 2 = 16 > qmax 15, so the top weight lands on 13.
    w = torch.tensor([[-1.5, 13.5, 0.0, 1.0]])
    got = RTNQuantizer(RTNConfig(bits=4, group_size=4, symmetric=False)).quantize_weight(w)
    assert got.tolist() == [[-2.0, 13.0, 0.0, 1.0]] == rtn_by_hand(w, 4, 4, False).tolist()


def test_rtn_bits_per_weight_counts_scales_and_zero_points():
    assert RTNQuantizer(RTNConfig(bits=4, group_size=128)).bits_per_weight((8, 256)) == 4 + 16 / 128
    assert RTNQuantizer(RTNConfig(bits=4, group_size=128, symmetric=False)).bits_per_weight((8, 256)) == 4 + 32 / 128
    assert RTNQuantizer(RTNConfig(bits=8, group_size=128, scale_bits=32)).bits_per_weight((8, 64)) == 8 + 32 / 64
    assert RTNConfig().bits == 8 and RTNConfig().group_size == 128 and RTNConfig().symmetric


def test_statistics_stream_like_the_formulas():
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(2, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g), torch.randn(5, 4, generator=g)]
    accs = make_accumulators({"gram", "col_sq_norm"}, 4, torch.device("cpu"))
    assert isinstance(accs["gram"], Gram) and isinstance(accs["col_sq_norm"], ColumnSqNorm)
    for x in batches:
        for acc in accs.values():
            acc.update(x)
    samples = [s for x in batches for s in (x if x.dim() == 3 else x.unsqueeze(0))]  # 4 samples of 5 tokens
    n = len(samples)
    torch.testing.assert_close(accs["col_sq_norm"].value, sum((s * s).sum(0) for s in samples) / n)
    torch.testing.assert_close(accs["gram"].value, sum(2 * s.T @ s for s in samples) / n)
    assert accs["gram"].nsamples == accs["col_sq_norm"].nsamples == 4
    assert accs["gram"].value.dtype == accs["col_sq_norm"].value.dtype == torch.float32
    with pytest.raises(PluginError, match=r"unknown statistics requested: \['hessian'\]"):
        make_accumulators({"hessian", "gram"}, 4, torch.device("cpu"))
    assert make_accumulators(set(), 4, torch.device("cpu")) == {}


def test_allocation_ratios_and_their_errors():
    assert block_ratios(AllocationConfig(), 3, 0.6) == [0.6, 0.6, 0.6]
    assert block_ratios(AllocationConfig(method="per_layer", ratios={2: 0.1, 0: 0.0}), 3, 0.6) == [0.0, 0.6, 0.1]
    with pytest.raises(ConfigError, match=r"name blocks \[3\], but the model has blocks 0..2"):
        block_ratios(AllocationConfig(method="per_layer", ratios={3: 0.5}), 3, 0.5)
    with pytest.raises(ConfigError, match="^OWL allocation needs the outlier scan first$"):
        block_ratios(AllocationConfig(method="owl"), 3, 0.5)
    owl = AllocationConfig(method="owl", owl_lambda=0.1)
    assert block_ratios(owl, 3, 0.5, [0.1, 0.2, 0.3]) == pytest.approx([0.6, 0.5, 0.4])
    assert owl_ratios([0.2, 0.2], 0.7, 0.1) == pytest.approx([0.7, 0.7])  # no spread: uniform
    with pytest.raises(ConfigError, match="lower owl_lambda"):
        owl_ratios([0.0, 1.0], 0.95, 0.2)  # 0.95 + 0.2 >= 1
    with pytest.raises(ConfigError, match="lower owl_lambda"):
        owl_ratios([0.0, 1.0], 0.1, 0.2)  # 0.1 - 0.2 < 0
    assert owl_ratios([0.0, 1.0], 0.1, 0.1) == pytest.approx([0.2, 0.0])  # exactly 0 is allowed
    with pytest.raises(ConfigError, match="lower owl_lambda"):
        owl_ratios([0.0, 1.0], 0.75, 0.25)  # exactly 1 is not: [1.0, 0.5]
    for bad in [{"method": "per_layer"}, {"method": "per_layer", "ratios": {0: 1.0}}, {"owl_lambda": 0.5}]:
        with pytest.raises(ValueError):
            AllocationConfig(**bad)
    assert outlier_ratio([torch.tensor([[1.0, 1.0]]), torch.tensor([2.0, 8.0])], 2.0) == 0.25  # mean 3: only 8
    assert outlier_ratio([torch.tensor([3.0, 3.0, 6.0])], 1.5) == 0.0  # mean 4, threshold 6: strictly above


def test_hessian_factor_and_its_fallbacks():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(30, 6, generator=g)
    h = x.T @ x
    damp = 0.01 * float(h.diag().mean())
    factor, used = inverse_hessian_cholesky(h, 0.01, 4)
    expected = torch.linalg.cholesky(torch.linalg.inv(h + damp * torch.eye(6)), upper=True)
    assert used == 0
    torch.testing.assert_close(factor, expected, rtol=1e-4, atol=1e-5)
    for retries in (0, 1):  # a healthy H needs no retry, however few are allowed
        again, used = inverse_hessian_cholesky(h, 0.01, retries)
        assert used == 0 and torch.equal(again, factor)
    # An indefinite H that 1x dampening cannot fix but 10x can: exactly one fallback.
    bad = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05]))
    damp = 0.02 * float(bad.diag().mean())  # 0.02 * 0.7375 = 0.01475: 10x makes the last entry positive
    factor, used = inverse_hessian_cholesky(bad, 0.02, 4)
    assert used == 1
    torch.testing.assert_close(factor, torch.diag((bad.diag() + 10 * damp) ** -0.5), rtol=1e-5, atol=1e-6)
    factor, used = inverse_hessian_cholesky(bad, 0.02, 0)  # no retries: straight to the diagonal fallback
    assert used == 1
    torch.testing.assert_close(factor, torch.diag(1 / (bad.diag().clamp_min(1e-8) + damp).sqrt()))


def variant_by_hand(metric: torch.Tensor, s: float, tol: float = 0.001):
    """The reference's use_variant bisection, one row at a time."""
    def given(alpha):
        mask = torch.zeros_like(metric, dtype=torch.bool)
        for r in range(metric.shape[0]):
            row = metric[r]
            sorted_row = torch.sort(row, stable=True)[0]
            below = int((torch.cumsum(sorted_row, 0) <= row.sum() * alpha).sum())
            if below > 0:  # the reference would gather index -1 here; the library prunes nothing
                mask[r] = row <= sorted_row[below - 1]
        return mask, float(mask.sum()) / mask.numel()

    alpha, lo, hi = 0.4, 0.0, 0.8
    mask, got = given(alpha)
    while abs(got - s) > tol and hi - lo >= tol:
        if got > s:
            alpha, hi = (alpha + lo) / 2, alpha
        else:
            alpha, lo = (alpha + hi) / 2, alpha
        mask, got = given(alpha)
    return mask, alpha


@pytest.mark.parametrize("s,tol,kind", [(0.02, 0.001, "flat rows"), (0.3, 0.001, "integers"), (0.7, 0.05, "integers"),
                                         (0.5, 0.001, "random")])
def test_variant_mask_matches_the_bisection_written_out(s, tol, kind):
    g = torch.Generator().manual_seed(13)
    if kind == "flat rows":  # uniform rows cannot prune at a small alpha; the others can
        metric = torch.cat([torch.ones(4, 40), torch.rand(4, 40, generator=g) ** 4 * 10])
    elif kind == "integers":  # cumulative sums hit alpha * row sum exactly
        metric = torch.randint(1, 5, (16, 10), generator=g).float()
    else:
        metric = torch.rand(16, 30, generator=g)
    expected, alpha = variant_by_hand(metric, s, tol)
    pruner = WandaPruner(WandaConfig(sparsity=s, use_variant=True, variant_tol=tol))
    mask = pruner.prune(metric.clone(), {"col_sq_norm": torch.ones(metric.shape[1])}, s)
    assert torch.equal(mask, expected) and variant_mask(metric, s, tol)[1] == alpha
    if tol == 0.001:
        assert torch.equal(variant_mask(metric, s)[0], expected)  # the default tolerance


@pytest.mark.parametrize("s", [0.2, 0.5])
def test_wanda_variant_and_nm_as_wired(s):
    g = torch.Generator().manual_seed(10)
    w = torch.randn(12, 40, generator=g)
    w[0] = 1e-4  # a row of tiny weights: its scores differ only through the activation norms
    stats = {"col_sq_norm": torch.rand(40, generator=g) * 3}
    pruner = WandaPruner(WandaConfig(sparsity=s, use_variant=True))
    mask = pruner.prune(w.clone(), stats, s)
    expected, alpha = variant_by_hand(wanda_metric(w, stats["col_sq_norm"]), s)
    assert torch.equal(mask, expected) and variant_mask(wanda_metric(w, stats["col_sq_norm"]), s)[1] == alpha
    assert abs(float(mask.float().mean()) - s) <= 0.001 + 1 / 40
    nm = WandaPruner(WandaConfig(pattern="2:4")).prune(w.clone(), stats, s)
    metric = (w.abs() * stats["col_sq_norm"].sqrt()).tolist()
    for r, row in enumerate(metric):
        for c0 in range(0, 40, 4):
            lowest = sorted(range(c0, c0 + 4), key=lambda c: (row[c], c))[:2]
            assert sorted(torch.nonzero(nm[r, c0 : c0 + 4]).flatten().add(c0).tolist()) == sorted(lowest)
    assert torch.equal(nm, nm_mask(wanda_metric(w, stats["col_sq_norm"]), 2, 4))
    with pytest.raises(ValueError, match="use_variant works only with pattern 'unstructured'"):
        WandaConfig(use_variant=True, pattern="2:4")
    assert math.isclose(WandaConfig().variant_tol, 0.001)
