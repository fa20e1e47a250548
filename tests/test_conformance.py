"""Every built-in pruner passes the shared conformance kit, exactly as a plugin would."""

from wanda_pipeline.plugins import discover
from wanda_pipeline.pruners.magnitude import MagnitudePruner
from wanda_pipeline.pruners.sparsegpt import SparseGPTPruner
from wanda_pipeline.pruners.wanda import WandaPruner
from wanda_pipeline.testing import PrunerConformance


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
