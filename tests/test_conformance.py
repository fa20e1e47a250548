"""Every built-in pruner passes the shared conformance kit, exactly as a plugin would."""

import pytest

from wanda_pipeline.plugins import discover
from wanda_pipeline.pruners.magnitude import MagnitudePruner
from wanda_pipeline.pruners.sparsegpt import SparseGPTPruner
from wanda_pipeline.pruners.wanda import WandaPruner
from wanda_pipeline.sparsity import per_layer_mask, per_row_mask, wanda_metric
from wanda_pipeline.testing import PrunerConformance, declared_group


class TestWanda(PrunerConformance):
    pruner_class = WandaPruner


class TestWandaPerLayer(PrunerConformance):
    pruner_class = WandaPruner
    options = {"group": "layer"}


class TestMagnitude(PrunerConformance):
    pruner_class = MagnitudePruner


class TestMagnitudePerOutput(PrunerConformance):
    pruner_class = MagnitudePruner
    options = {"group": "output"}


def test_built_ins_come_from_entry_points():
    reg = discover()
    assert reg.get("pruner", "wanda") is WandaPruner
    assert reg.get("pruner", "magnitude") is MagnitudePruner
    assert reg.plugins[("pruner", "wanda")].package == "wanda-pipeline"


class TestSparseGPT(PrunerConformance):
    pruner_class = SparseGPTPruner
    options = {"blocksize": 8}
    comparison_group = "layer"  # int(numel * s) spread over column blocks, compared across rows


class _NoGroup:
    """A pruner that compares per row but declares no group: the kit must refuse to guess."""

    Config = SparseGPTPruner.Config

    def __init__(self, config=None):
        self.config = config or self.Config()


def test_kit_refuses_a_pruner_without_a_declared_group():
    with pytest.raises(AssertionError, match="declares no comparison group"):
        declared_group(_NoGroup())
    assert declared_group(_NoGroup(), "layer") == "layer"
    assert declared_group(WandaPruner()) == "output" and declared_group(MagnitudePruner()) == "layer"


class _AlwaysPerRow(WandaPruner):
    def prune(self, weight, stats, sparsity):
        return per_row_mask(wanda_metric(weight, stats["col_sq_norm"]), sparsity)


class _AlwaysPerLayer(MagnitudePruner):
    def prune(self, weight, stats, sparsity):
        return per_layer_mask(weight.abs(), sparsity)


@pytest.mark.parametrize("pruner_class,declared", [(_AlwaysPerRow, "layer"), (_AlwaysPerLayer, "output")])
def test_kit_fails_a_pruner_that_compares_in_another_group(pruner_class, declared):
    kit = type("Kit", (PrunerConformance,), {"pruner_class": pruner_class, "options": {"group": declared}})()
    with pytest.raises(AssertionError):
        kit.test_exact_unstructured_sparsity()
