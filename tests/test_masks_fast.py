"""The fast mask selection (kthvalue thresholds, N:M selection network) against the plain
algorithms it replaced, written out here: a stable sort per row, a stable sort over the
flattened matrix, and the reference code's loop of ``topk`` over each group of M columns."""

import itertools

import pytest
import torch

from wanda_pipeline import sparsity
from wanda_pipeline.sparsity import nm_mask, per_layer_mask, per_row_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(8, 16), (31, 57), (64, 203)]


def sorted_rows(metric, s):
    k = int(metric.shape[1] * s)
    order = torch.sort(metric, dim=1, stable=True)[1]
    return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, order[:, :k], True)


def sorted_layer(metric, s):
    k = int(metric.numel() * s)
    flat = torch.zeros(metric.numel(), dtype=torch.bool)
    flat[torch.sort(metric.flatten(), stable=True)[1][:k]] = True
    return flat.view_as(metric)


def column_loop(metric, n, m):
    mask = torch.zeros_like(metric, dtype=torch.bool)
    for ii in range(0, (metric.shape[1] // m) * m, m):
        tmp = metric[:, ii : ii + m].float()
        mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    return mask


def matrix(kind, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.rand(*shape, generator=g)
    elif kind == "ties":  # a handful of values: ties at every threshold
        x = torch.randint(0, 4, shape, generator=g).float()
    else:  # ties, signed zeros, infinities and NaN
        x = torch.randint(0, 3, shape, generator=g).float()
        specials = torch.tensor([-0.0, float("inf"), float("nan"), -float("inf")])
        pick = torch.rand(*shape, generator=g) < 0.15
        x[pick] = specials[torch.randint(0, 4, (int(pick.sum()),), generator=g)]
    return x.to(dtype)


@pytest.fixture(params=[None, 64], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(sparsity, "_CHUNK_ELEMS", request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "specials"])
def test_per_row_equals_stable_sort(kind, dtype, chunking):
    for shape in SHAPES:
        metric = matrix(kind, shape, dtype)
        for s in [0.1, 0.5, 0.73, 0.95]:
            assert torch.equal(per_row_mask(metric, s), sorted_rows(metric, s)), (shape, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "specials"])
def test_per_layer_equals_flat_stable_sort(kind, dtype):
    for shape in SHAPES:
        metric = matrix(kind, shape, dtype, seed=1)
        for s in [0.1, 0.5, 0.73]:
            assert torch.equal(per_layer_mask(metric, s), sorted_layer(metric, s)), (shape, s)


NM = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (2, 5), (3, 6), (8, 16), (16, 32), (5, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "specials"])
def test_nm_equals_reference_column_loop(kind, dtype, chunking):
    for n, m in NM:
        for rows, extra in [(7, 0), (33, m - 1)]:  # a partial trailing group stays dense
            metric = matrix(kind, (rows, 6 * m + extra), dtype, seed=n * m)
            got = nm_mask(metric, n, m)
            assert torch.equal(got, column_loop(metric, n, m)), (n, m, rows, extra)
            assert not got[:, 6 * m :].any()


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6, 8])
def test_selection_network_on_every_permutation(m):
    """Distinct values: the network alone decides (no tie fallback), for every order and every n."""
    perms = torch.tensor(list(itertools.permutations(range(m))), dtype=torch.float32)
    for n in range(1, m):
        assert torch.equal(nm_mask(perms, n, m), perms < n), (n, m)


def test_nm_tie_rule_is_topks_not_stable_sort():
    """Where the two rules differ, the mask follows topk (what the reference code runs)."""
    g = torch.Generator().manual_seed(5)
    metric = torch.randint(0, 2, (256, 4), generator=g).float()
    stable = sorted_rows(metric, 0.5)
    got = nm_mask(metric, 2, 4)
    assert torch.equal(got, column_loop(metric, 2, 4))
    if not torch.equal(column_loop(metric, 2, 4), stable):  # CPU topk's own rule shows up here
        assert not torch.equal(got, stable)
