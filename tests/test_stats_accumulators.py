"""Streaming statistics equal their one-shot definitions over all samples, whatever the batching:
col_sq_norm = ||X_j||^2 / n per input column, gram = 2/n X^T X (n = calibration sequences)."""

from __future__ import annotations

import pytest
import torch

from wanda_pipeline.errors import PluginError
from wanda_pipeline.stats import STATS, ColumnSqNorm, Gram, make_accumulators

CPU = torch.device("cpu")


def data(n=5, seq=4, d=6, seed=0):
    return torch.randn(n, seq, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def direct(x, samples):
    flat = x.reshape(-1, x.shape[-1]).double()
    return (flat ** 2).sum(0) / samples, 2 / samples * flat.t() @ flat


@pytest.mark.parametrize("splits", [[5], [1, 4], [2, 2, 1], [1, 1, 1, 1, 1]])
def test_streamed_statistics_equal_the_direct_ones(splits):
    x = data()
    norm, gram = ColumnSqNorm(6, CPU), Gram(6, CPU)
    for part in x.split(splits):
        for acc in (norm, gram):
            acc.update(part)
    want_norm, want_gram = direct(x, 5)
    assert norm.nsamples == gram.nsamples == 5
    assert norm.value.dtype == gram.value.dtype == torch.float32
    torch.testing.assert_close(norm.value.double(), want_norm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram.value.double(), want_gram, rtol=1e-5, atol=1e-6)


def test_flattened_inputs_count_the_given_sequences():
    """OPT's MLP sees (batch * seq, hidden): the engine passes the sequence count."""
    x = data()
    norm, gram = ColumnSqNorm(6, CPU), Gram(6, CPU)
    for part in x.split([3, 2]):
        for acc in (norm, gram):
            acc.update(part.reshape(-1, 6), samples=part.shape[0])
    want_norm, want_gram = direct(x, 5)
    torch.testing.assert_close(norm.value.double(), want_norm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram.value.double(), want_gram, rtol=1e-5, atol=1e-6)


def test_a_2d_input_without_a_count_is_one_sequence():
    x = data(n=1)[0]
    acc = ColumnSqNorm(6, CPU)
    acc.update(x)
    assert acc.nsamples == 1
    torch.testing.assert_close(acc.value.double(), direct(x, 1)[0], rtol=1e-5, atol=1e-6)


def test_make_accumulators_by_name_and_unknown_names():
    accs = make_accumulators({"gram", "col_sq_norm"}, 3, CPU)
    assert list(accs) == ["col_sq_norm", "gram"] and set(STATS) == {"col_sq_norm", "gram"}
    assert accs["col_sq_norm"].value.shape == (3,) and accs["gram"].value.shape == (3, 3)
    assert all(torch.count_nonzero(a.value) == 0 and a.nsamples == 0 for a in accs.values())
    with pytest.raises(PluginError) as err:
        make_accumulators({"gram", "hessian", "abs_max"}, 3, CPU)
    assert "['abs_max', 'hessian']" in str(err.value) and "['col_sq_norm', 'gram']" in str(err.value)
