"""Mask edge paths the random-matrix tests do not reach: k = 0 and k = 1, a NaN k-th value,
a backend without ``kthvalue``, M above the selection network's limit, and the promise that
only rows with ties at the threshold pay for the exact tie rule. Each is compared with a
stable sort or a ``topk`` loop written out here."""

import pytest
import torch

from wanda_pipeline import sparsity
from wanda_pipeline.sparsity import apply_mask, nm_mask, per_layer_mask, per_row_mask


def sorted_rows(metric, k):
    order = torch.sort(metric, dim=1, stable=True)[1]
    return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, order[:, :k], True)


def sorted_flat(metric, k):
    flat = torch.zeros(metric.numel(), dtype=torch.bool)
    flat[torch.sort(metric.flatten(), stable=True)[1][:k]] = True
    return flat.view_as(metric)


def topk_loop(metric, n, m):
    mask = torch.zeros_like(metric, dtype=torch.bool)
    for c in range(0, (metric.shape[1] // m) * m, m):
        mask[:, c : c + m].scatter_(1, torch.topk(metric[:, c : c + m].float(), n, dim=1, largest=False)[1], True)
    return mask


def ties(shape, seed, values=3):
    return torch.randint(0, values, shape, generator=torch.Generator().manual_seed(seed)).float()


def test_nothing_to_prune_gives_a_usable_all_false_mask():
    metric = torch.rand(4, 6)
    for mask in (per_row_mask(metric, 0.1), per_layer_mask(metric, 0.04), nm_mask(metric, 2, 8)):
        assert mask.dtype == torch.bool and mask.shape == metric.shape and not mask.any()
        w = metric.clone()
        apply_mask(w, mask)  # masked_fill_ only takes a bool mask
        assert torch.equal(w, metric)


def test_per_layer_prunes_the_single_smallest_when_k_is_one():
    metric = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) + 1
    metric[2, 3] = 0.5
    mask = per_layer_mask(metric, 0.05)  # int(20 * 0.05) = 1
    assert mask.dtype == torch.bool and int(mask.sum()) == 1 and bool(mask[2, 3])


@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
def test_per_layer_with_a_nan_kth_value_is_the_flat_stable_sort(s):
    metric = ties((6, 8), 1)
    metric[torch.rand(6, 8, generator=torch.Generator().manual_seed(2)) < 0.6] = float("nan")
    k = int(metric.numel() * s)
    assert torch.isnan(torch.sort(metric.flatten())[0][k - 1]), "the k-th value is NaN"
    mask = per_layer_mask(metric, s)
    assert mask.dtype == torch.bool and mask.shape == metric.shape
    assert torch.equal(mask, sorted_flat(metric, k))


def no_kthvalue(*args, **kwargs):
    raise NotImplementedError("kthvalue is not implemented for this backend")


@pytest.mark.parametrize("s", [0.3, 0.5, 0.8])
def test_masks_without_kthvalue_are_the_stable_sorts(s, monkeypatch):
    metric = ties((7, 10), 3)
    monkeypatch.setattr(torch, "kthvalue", no_kthvalue)
    row = per_row_mask(metric, s)
    assert row.dtype == torch.bool and torch.equal(row, sorted_rows(metric, int(10 * s)))
    layer = per_layer_mask(metric, s)
    assert layer.dtype == torch.bool and torch.equal(layer, sorted_flat(metric, int(70 * s)))


def test_only_rows_tied_at_the_threshold_take_the_tie_rule_and_none_need_the_sort(monkeypatch):
    """The docstring's cost promise: rows whose k-th value is unique are settled by the threshold,
    tied rows by the index rule, and only NaN thresholds fall back to a full sort."""
    g = torch.Generator().manual_seed(4)
    metric = torch.rand(9, 12, generator=g)
    metric[[1, 4, 7]] = ties((3, 12), 5)  # finite ties at the threshold in these rows only
    tie_rows, sorted_rows_seen = [], []
    ties_by_index, stable_lowest = sparsity._ties_by_index, sparsity._stable_lowest

    def spy_ties(m, t, k):
        tie_rows.extend(m.tolist())
        return ties_by_index(m, t, k)

    def spy_sort(m, k):
        sorted_rows_seen.append(m.shape[0])
        return stable_lowest(m, k)

    monkeypatch.setattr(sparsity, "_ties_by_index", spy_ties)
    monkeypatch.setattr(sparsity, "_stable_lowest", spy_sort)
    mask = per_row_mask(metric, 0.5)
    assert torch.equal(mask, sorted_rows(metric, 6))
    assert sorted(tie_rows) == sorted(metric[[1, 4, 7]].tolist())
    assert sorted_rows_seen == []


@pytest.mark.parametrize("n,m", [(5, 40), (20, 64), (1, 33)])
def test_nm_above_the_network_limit_matches_the_topk_loop(n, m):
    for metric in (torch.rand(5, 3 * m + 7, generator=torch.Generator().manual_seed(m)), ties((5, 2 * m), m)):
        mask = nm_mask(metric, n, m)
        assert mask.dtype == torch.bool and torch.equal(mask, topk_loop(metric, n, m))


@pytest.mark.filterwarnings("error")  # each chunk writes its own rows: no resized `out=` (deprecated in torch)
def test_nm_in_many_row_chunks_matches_the_topk_loop(monkeypatch):
    """Rows beyond the first chunk must be written too (the chunks of the CPU path)."""
    monkeypatch.setattr(sparsity, "_CHUNK_ELEMS", 48)  # 48 // 16 columns = 3 rows a chunk
    metric = torch.rand(10, 16, generator=torch.Generator().manual_seed(6))
    metric[8] = ties((1, 16), 7)  # a tied group in the last chunk
    assert torch.equal(nm_mask(metric, 2, 4), topk_loop(metric, 2, 4))
