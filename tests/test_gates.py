"""Quality gates are pure functions of the metrics."""

from wanda_pipeline.config import GateSpec
from wanda_pipeline.tracking.gates import evaluate_gates

PRUNED = {"ppl_wikitext2": 26.0, "sparsity_total": 0.5, "zeroshot_mean": 0.50}
DENSE = {"ppl_wikitext2": 20.0, "zeroshot_mean": 0.52}


def by_name(results):
    return {g.name: g for g in results}


def test_all_gates_pass():
    gates = GateSpec(max_ppl_ratio=1.3, min_zeroshot_ratio=0.95, beat_champion="ppl_wikitext2", bound="point")
    res = by_name(evaluate_gates(gates, PRUNED, DENSE, 0.5, champion=None))
    assert all(g.passed for g in res.values()) and set(res) == {"max_ppl_ratio", "min_zeroshot_ratio",
                                                                 "min_sparsity", "beat_champion"}
    assert "1.300x" in res["max_ppl_ratio"].detail


def test_each_gate_can_fail():
    point = {"bound": "point"}
    assert not by_name(evaluate_gates(GateSpec(max_ppl_ratio=1.29, **point), PRUNED, DENSE, 0.5))[
        "max_ppl_ratio"].passed
    zs = evaluate_gates(GateSpec(min_zeroshot_ratio=0.97, **point), PRUNED, DENSE, 0.5)
    assert not by_name(zs)["min_zeroshot_ratio"].passed  # 0.50/0.52 = 0.9615
    assert not by_name(evaluate_gates(GateSpec(), PRUNED, DENSE, 0.6))["min_sparsity"].passed
    # beat_champion needs per-example results on both sides (tests/test_gates_paired.py); without: fail closed
    champ = evaluate_gates(GateSpec(beat_champion="ppl_wikitext2"), PRUNED, DENSE, 0.5, {"ppl_wikitext2": 27.0})
    assert not by_name(champ)["beat_champion"].passed


def test_missing_metrics_fail_closed():
    for bound in ("point", "interval"):
        res = by_name(evaluate_gates(GateSpec(max_ppl_ratio=2.0, bound=bound), {"sparsity_total": 0.5}, {}, 0.5))
        assert not res["max_ppl_ratio"].passed
        # the interval bound needs the dense model's per-example results too
        with_dense = by_name(evaluate_gates(GateSpec(max_ppl_ratio=2.0, bound=bound), PRUNED, DENSE, 0.5))
        assert with_dense["max_ppl_ratio"].passed == (bound == "point")
    assert by_name(evaluate_gates(GateSpec(beat_champion="ppl_wikitext2"), PRUNED, DENSE, 0.5, None))[
        "beat_champion"].passed  # no champion yet: the first one wins


def test_decide_promotes_only_when_every_gate_passes():
    import itertools

    from wanda_pipeline.tracking.gates import GateResult
    from wanda_pipeline.tracking.promotion import decide

    names = ["max_ppl_ratio", "min_zeroshot_ratio", "min_sparsity", "beat_champion"]
    for outcome in itertools.product([True, False], repeat=len(names)):
        gates = [GateResult(n, ok, f"{n} detail") for n, ok in zip(names, outcome, strict=True)]
        d = decide(gates)
        assert d.promote == all(outcome)
        for n, ok in zip(names, outcome, strict=True):
            assert (f"{n}: {n} detail" in d.reason) == (not ok)


def test_registry_error_fails_closed_even_if_every_gate_passes():
    from wanda_pipeline.tracking.gates import GateResult
    from wanda_pipeline.tracking.promotion import decide

    d = decide([GateResult("min_sparsity", True, "ok")], registry_error="connection refused")
    assert not d.promote and "registry error: connection refused" in d.reason
