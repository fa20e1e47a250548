"""Gates that see noise: paired tests on synthetic per-example results.

A clearly better candidate is promoted, a tie within noise and a clearly worse one are not, and
every way the comparison cannot be made fails closed with its reason."""

import numpy as np
import pytest

from wanda_pipeline.config import GateSpec
from wanda_pipeline.tracking.gates import evaluate_gates, gate_tags

TASKS = ["boolq", "rte", "arc_easy"]


def ppl_examples(nll, digest="tok-1"):
    nll = list(map(float, nll))
    return {"ppl_wikitext2": {"kind": "nll", "ids": list(range(len(nll))), "values": nll, "digest": digest}}


def ppl_metrics(nll):
    return {"ppl_wikitext2": float(np.exp(np.mean(nll))), "sparsity_total": 0.5}


def acc_examples(per_task, digest="docs-1"):
    out = {f"zeroshot_{t}_acc": {"kind": "correct", "ids": list(range(len(v))), "values": list(map(int, v)),
                                 "digest": f"{digest}-{t}"} for t, v in per_task.items()}
    out["zeroshot_mean"] = {"kind": "mean_of", "parts": [f"zeroshot_{t}_acc" for t in per_task]}
    return out


def acc_metrics(per_task):
    m = {f"zeroshot_{t}_acc": float(np.mean(v)) for t, v in per_task.items()}
    return {**m, "zeroshot_mean": float(np.mean(list(m.values()))), "sparsity_total": 0.5}


def flip(values, wrong_to_right, right_to_wrong, seed=0):
    """A copy of 0/1 ``values`` with that many wrong answers made right and right ones made wrong."""
    v = np.array(values)
    rng = np.random.default_rng(seed)
    v[rng.choice(np.flatnonzero(v == 0), wrong_to_right, replace=False)] = 1
    v[rng.choice(np.flatnonzero(np.array(values) == 1), right_to_wrong, replace=False)] = 0
    return v


RNG = np.random.default_rng(42)
CHAMP_NLL = RNG.normal(3.2, 0.35, size=32)  # windows differ far more than the models do
NOISE = RNG.normal(0, 0.01, size=32)
CHAMP_ACC = {t: (RNG.random(300) < 0.55).astype(int) for t in TASKS}


def beat(gates, cand_m, cand_ex, champ_m, champ_ex):
    res = evaluate_gates(gates, cand_m, {}, 0.5, champ_m, examples=cand_ex, champion_examples=champ_ex)
    return {g.name: g for g in res}["beat_champion"]


@pytest.mark.parametrize("shift,outcome", [(-0.03, "better"), (0.0, "tie"), (0.03, "worse")])
def test_perplexity_beat_champion_is_a_paired_window_test(shift, outcome):
    cand = CHAMP_NLL + shift + NOISE
    g = beat(GateSpec(beat_champion="ppl_wikitext2"), ppl_metrics(cand), ppl_examples(cand),
             ppl_metrics(CHAMP_NLL), ppl_examples(CHAMP_NLL))
    assert g.outcome == outcome and g.passed == (outcome == "better")
    assert "paired bootstrap over windows" in g.test and "95%, n=32" in g.interval
    if outcome == "tie":
        assert g.detail.startswith("tie within noise at 95%") and "the alias stays where it is" in g.detail
    # An unpaired look would call even the 3% shift noise: the windows' own spread is 10x larger.
    assert np.std(CHAMP_NLL) / np.sqrt(32) > abs(shift) * 1.5 or outcome == "tie"


@pytest.mark.parametrize("gained,lost,outcome", [(40, 5, "better"), (12, 12, "tie"), (16, 8, "tie"),
                                                  (5, 40, "worse")])
def test_accuracy_beat_champion_is_exact_mcnemar(gained, lost, outcome):  # 16 vs 8: p = 0.15, not enough
    champ = {"boolq": CHAMP_ACC["boolq"]}
    cand = {"boolq": flip(champ["boolq"], gained, lost)}
    g = beat(GateSpec(beat_champion="zeroshot_boolq_acc"), acc_metrics(cand), acc_examples(cand),
             acc_metrics(champ), acc_examples(champ))
    assert g.outcome == outcome and g.passed == (outcome == "better")
    assert g.test.startswith("exact McNemar, p = ")
    assert f"right only for the candidate: {gained}, only for the champion: {lost}" in g.detail


@pytest.mark.parametrize("gained,lost,outcome", [(25, 3, "better"), (10, 10, "tie"), (3, 25, "worse")])
def test_zeroshot_mean_beat_champion_is_a_stratified_paired_bootstrap(gained, lost, outcome):
    cand = {t: flip(v, gained, lost, seed=i) for i, (t, v) in enumerate(CHAMP_ACC.items())}
    g = beat(GateSpec(beat_champion="zeroshot_mean"), acc_metrics(cand), acc_examples(cand),
             acc_metrics(CHAMP_ACC), acc_examples(CHAMP_ACC))
    assert g.outcome == outcome and g.passed == (outcome == "better")
    assert "stratified by task" in g.test and "n=900" in g.interval


def test_a_handful_of_disagreements_cannot_decide_a_mean():
    cand = {t: flip(v, 1, 0, seed=i) for i, (t, v) in enumerate(CHAMP_ACC.items())}  # 3 wins, no losses
    g = beat(GateSpec(beat_champion="zeroshot_mean"), acc_metrics(cand), acc_examples(cand),
             acc_metrics(CHAMP_ACC), acc_examples(CHAMP_ACC))
    assert g.outcome == "tie" and not g.passed and "fewer than 6 disagreements" in g.detail


def test_beat_champion_fails_closed_when_the_examples_do_not_pair():
    gates = GateSpec(beat_champion="ppl_wikitext2")
    cand = CHAMP_NLL - 0.1
    m, ex = ppl_metrics(cand), ppl_examples(cand)
    cases = {
        "no per-example results": None,
        "scored on 32 examples here and 16": ppl_examples(CHAMP_NLL[:16]),
        "different contents": ppl_examples(CHAMP_NLL, digest="tok-2"),
    }
    for reason, champ_ex in cases.items():
        g = beat(gates, m, ex, ppl_metrics(CHAMP_NLL), champ_ex)
        assert not g.passed and reason in g.detail, (reason, g.detail)
    first = beat(gates, m, ex, None, None)
    assert first.passed and "no current champion" in first.detail
    few = beat(gates, ppl_metrics(cand[:5]), ppl_examples(cand[:5]), ppl_metrics(CHAMP_NLL[:5]),
               ppl_examples(CHAMP_NLL[:5]))
    assert not few.passed and "5 paired examples; a decision at this confidence needs at least 6" in few.detail
    wrong_way = beat(GateSpec(beat_champion="ppl_wikitext2", lower_is_better=False), m, ex, ppl_metrics(CHAMP_NLL),
                     ppl_examples(CHAMP_NLL))
    assert not wrong_way.passed and "lower is better, but the gate says lower_is_better: False" in wrong_way.detail


def test_confidence_moves_the_line_between_better_and_tie():
    cand = CHAMP_NLL - 0.003 + NOISE  # about two standard errors (0.0013) better
    args = (ppl_metrics(cand), ppl_examples(cand), ppl_metrics(CHAMP_NLL), ppl_examples(CHAMP_NLL))
    assert beat(GateSpec(beat_champion="ppl_wikitext2", confidence=0.8), *args).outcome == "better"
    assert beat(GateSpec(beat_champion="ppl_wikitext2", confidence=0.999), *args).outcome == "tie"


def ratio_gates(bound, limit, cand_nll, dense_nll):
    gates = GateSpec(max_ppl_ratio=limit, bound=bound)
    res = evaluate_gates(gates, ppl_metrics(cand_nll), ppl_metrics(dense_nll), 0.5,
                         examples=ppl_examples(cand_nll), dense_examples=ppl_examples(dense_nll))
    return res[0]


def test_ratio_gate_point_or_interval():
    dense = CHAMP_NLL
    cand = dense + np.log(1.25) + RNG.normal(0, 0.05, size=32)  # ratio about 1.25, with a visible interval
    point = float(np.exp(np.mean(cand - dense)))
    at_point = ratio_gates("point", point + 0.002, cand, dense)
    assert at_point.passed and at_point.test == "point estimate"
    assert "crosses the limit: within noise" in at_point.detail
    interval = ratio_gates("interval", point + 0.002, cand, dense)
    assert not interval.passed and "the upper end of its" in interval.detail
    assert ratio_gates("interval", point + 0.1, cand, dense).passed
    assert not ratio_gates("point", point - 0.002, cand, dense).passed
    no_dense_examples = evaluate_gates(GateSpec(max_ppl_ratio=2.0), ppl_metrics(cand), ppl_metrics(dense), 0.5,
                                       examples=ppl_examples(cand))
    assert not no_dense_examples[0].passed and "cannot bound it at 95%" in no_dense_examples[0].detail


def test_zeroshot_ratio_gate_uses_the_lower_end():
    dense = CHAMP_ACC
    cand = {t: flip(v, 5, 20, seed=i) for i, (t, v) in enumerate(dense.items())}  # about 0.91x dense
    point = acc_metrics(cand)["zeroshot_mean"] / acc_metrics(dense)["zeroshot_mean"]
    for bound, limit, passed in [("point", point - 0.01, True), ("interval", point - 0.01, False),
                                 ("interval", point - 0.1, True)]:
        res = evaluate_gates(GateSpec(min_zeroshot_ratio=limit, bound=bound), acc_metrics(cand), acc_metrics(dense),
                             0.5, examples=acc_examples(cand), dense_examples=acc_examples(dense))
        assert res[0].passed == passed, (bound, limit, res[0].detail)


def test_version_tags_record_the_test_and_interval_of_each_decision():
    cand = CHAMP_NLL - 0.03 + NOISE
    gates = GateSpec(max_ppl_ratio=1.5, beat_champion="ppl_wikitext2", confidence=0.9)
    res = evaluate_gates(gates, ppl_metrics(cand), ppl_metrics(CHAMP_NLL), 0.5, ppl_metrics(CHAMP_NLL),
                         examples=ppl_examples(cand), dense_examples=ppl_examples(CHAMP_NLL),
                         champion_examples=ppl_examples(CHAMP_NLL))
    tags = gate_tags(gates, res)
    assert tags["gates.confidence"] == "0.9" and tags["gates.bound"] == "interval"
    assert tags["gate.beat_champion"] == "pass" and tags["gate.beat_champion.outcome"] == "better"
    assert tags["gate.beat_champion.test"].startswith("paired bootstrap over windows")
    assert "(90%, n=32)" in tags["gate.beat_champion.interval"] and "(90%, n=32)" in tags["gate.max_ppl_ratio.interval"]
    assert tags["gate.min_sparsity"] == "pass"
