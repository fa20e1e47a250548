"""The pure promotion policy's answer as callers use it: a real bool, and a reason that lists
exactly the failed gates, in gate order, one "name: detail" entry each."""

import itertools

from wanda_pipeline.tracking.gates import GateResult
from wanda_pipeline.tracking.promotion import decide

NAMES = ["max_ppl_ratio", "min_zeroshot_ratio", "min_sparsity", "beat_champion"]


def test_reason_lists_each_failed_gate_once_in_order():
    for outcome in itertools.product([True, False], repeat=len(NAMES)):
        gates = [GateResult(n, ok, f"measured {i}, needs more") for i, (n, ok) in enumerate(zip(NAMES, outcome,
                                                                                                strict=True))]
        d = decide(gates)
        assert d.promote is all(outcome)
        if not all(outcome):
            entries = d.reason.split("; ")
            assert entries == [f"{g.name}: {g.detail}" for g in gates if not g.passed]


def test_a_registry_error_is_a_plain_false():
    d = decide([GateResult("min_sparsity", True, "ok")], registry_error="timeout")
    assert d.promote is False and d.reason.endswith("timeout")
    passed = decide([GateResult("min_sparsity", True, "ok")])
    assert passed.promote is True and passed.reason == "passed all gates"  # the reason tagged on the version
