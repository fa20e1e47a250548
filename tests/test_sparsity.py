"""Mask functions against formulas written out here, independently of the library."""

import pytest
import torch

from wanda_pipeline.errors import ConfigError
from wanda_pipeline.sparsity import (
    apply_mask,
    nm_mask,
    parse_pattern,
    per_layer_mask,
    per_row_mask,
    respects_nm,
    select_mask,
    variant_mask,
    wanda_metric,
)


def seed_snippet(W: torch.Tensor, X: torch.Tensor, s: float) -> torch.Tensor:
    """The paper's snippet: metric = |W| * ||X||_2 per input column; zero the lowest int(C_in*s) per row."""
    metric = W.abs() * X.norm(p=2, dim=0)
    _, sorted_idx = torch.sort(metric, dim=1, stable=True)
    pruned_idx = sorted_idx[:, : int(W.shape[1] * s)]
    out = W.clone()
    out.scatter_(dim=1, index=pruned_idx, value=0)
    return out


@pytest.mark.parametrize("s", [0.1, 0.5, 0.73])
@pytest.mark.parametrize("shape", [(8, 16), (31, 57)])
def test_wanda_per_row_matches_seed_snippet(shape, s):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g)
    X = torch.randn(40, shape[1], generator=g)
    col_sq_norm = (X * X).sum(0)  # ||X_j||^2 up to the scale the engine applies
    mask = per_row_mask(wanda_metric(W, col_sq_norm), s)
    got = W.clone()
    apply_mask(got, mask)
    assert torch.equal(got, seed_snippet(W, X, s))
    assert int(mask.sum()) == shape[0] * int(shape[1] * s)


def test_ties_go_to_lower_column_like_a_stable_sort():
    metric = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.5]])
    mask = per_row_mask(metric, 0.5)
    assert mask.tolist() == [[True, True, False, False], [False, True, False, True]]


def test_metric_is_abs_w_times_column_norm():
    W = torch.tensor([[-2.0, 3.0], [1.0, -1.0]])
    assert torch.allclose(wanda_metric(W, torch.tensor([4.0, 9.0])), torch.tensor([[4.0, 9.0], [2.0, 3.0]]))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_a_column_loop(n, m):
    g = torch.Generator().manual_seed(2)
    metric = torch.rand(12, 8 * m + 3, generator=g)  # trailing partial group stays dense
    expected = torch.zeros_like(metric, dtype=torch.bool)
    for ii in range(0, (metric.shape[1] // m) * m, m):  # the reference's loop, written out
        tmp = metric[:, ii : ii + m].float()
        expected.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    got = nm_mask(metric, n, m)
    assert torch.equal(got, expected)
    w = torch.ones_like(metric)
    apply_mask(w, got)
    assert respects_nm(w, n, m)
    assert not got[:, -3:].any()


def test_per_layer_prunes_exactly_k_smallest():
    metric = torch.tensor([[5.0, 1.0, 3.0], [2.0, 6.0, 4.0]])
    mask = per_layer_mask(metric, 0.5)  # int(6 * 0.5) = 3 smallest over the whole matrix: 1, 2, 3
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    tied = torch.ones(2, 3)
    assert int(per_layer_mask(tied, 0.5).sum()) == 3  # exactly k even when every score ties


@pytest.mark.parametrize("s", [0.3, 0.5, 0.6])
def test_variant_reaches_target_within_tolerance(s):
    g = torch.Generator().manual_seed(3)
    metric = torch.rand(64, 128, generator=g) ** 2
    mask, alpha, achieved = variant_mask(metric, s, tol=0.001)
    assert achieved == pytest.approx(float(mask.float().mean()))
    assert abs(achieved - s) <= 0.001 + 1.0 / mask.shape[1]
    # Each row's pruned weights sum to at most alpha of the row's total metric (the variant's rule).
    pruned_mass = (metric * mask).sum(1)
    assert bool((pruned_mass <= alpha * metric.sum(1) + 1e-5).all())


def test_select_mask_dispatch_and_errors():
    metric = torch.rand(4, 8)
    assert torch.equal(select_mask(metric, 0.5, "2:4"), nm_mask(metric, 2, 4))
    assert torch.equal(select_mask(metric, 0.5, "unstructured", "layer"), per_layer_mask(metric, 0.5))
    for bad in ["4:2", "2:2", "0:4", "a:b", "dense"]:
        with pytest.raises(ConfigError):
            parse_pattern(bad)
    for bad in [1.0, -0.1, 1.5]:
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            per_row_mask(metric, bad)
