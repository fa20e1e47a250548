import torch
from wanda_ria import RIAPruner, ria_metric

from wanda_pipeline.testing import PrunerConformance


class TestRIAConformance(PrunerConformance):
    pruner_class = RIAPruner


def test_ria_metric_formula():
    w = torch.tensor([[1.0, -3.0], [2.0, 4.0]])
    x_sq = torch.tensor([16.0, 1.0])
    # |w|/rowsum + |w|/colsum, times ||x||^0.5 = sqrt(sqrt(x_sq))
    expected = torch.tensor([[1 / 4 + 1 / 3, 3 / 4 + 3 / 7], [2 / 6 + 2 / 3, 4 / 6 + 4 / 7]]) * torch.tensor([2.0, 1.0])
    torch.testing.assert_close(ria_metric(w, x_sq, 0.5), expected)
