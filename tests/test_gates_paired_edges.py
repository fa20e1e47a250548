"""The edges of the noise-aware gates: what each result records (test, interval text, the words
a user reads), the fewest examples a decision needs, and a gate whose direction is wrong.
Written against the survivors of the 2026-12-04 `make mutants` run in tracking/gates.py."""

import numpy as np
import pytest

from wanda_pipeline import intervals as iv
from wanda_pipeline.config import GateSpec
from wanda_pipeline.tracking.gates import evaluate_gates

RNG = np.random.default_rng(7)
DENSE_NLL = RNG.normal(3.0, 0.3, size=32)
NEED = iv.min_paired_examples(0.95)  # 6


def nll_ex(nll, digest="tok"):
    return {"ppl_wikitext2": {"kind": "nll", "ids": list(range(len(nll))), "values": [float(v) for v in nll],
                              "digest": digest}}


def ppl(nll):
    return {"ppl_wikitext2": float(np.exp(np.mean(nll))), "sparsity_total": 0.5}


def ratio_gate(gates, pruned, dense, digest="tok"):
    res = evaluate_gates(gates, ppl(pruned), ppl(dense), 0.5, examples=nll_ex(pruned, digest),
                         dense_examples=nll_ex(dense))
    return {g.name: g for g in res}["max_ppl_ratio"]


@pytest.mark.parametrize("bound", ["interval", "point"])
def test_too_few_windows_cannot_bound_the_ratio_and_say_how_many_are_needed(bound):
    dense = DENSE_NLL[: NEED - 1]
    g = ratio_gate(GateSpec(max_ppl_ratio=3.0, bound=bound), dense + 0.1, dense)
    assert f"{NEED - 1} paired examples; a decision at this confidence needs at least {NEED}" in g.detail
    if bound == "interval":
        assert g.passed is False and g.test == "paired bootstrap" and "cannot bound it at 95%" in g.detail
    else:  # the point estimate decides; the record says there was no interval
        assert g.passed is True and g.test == "point" and "no interval" in g.detail


def test_exactly_the_minimum_number_of_windows_decides():
    dense = DENSE_NLL[:NEED]
    g = ratio_gate(GateSpec(max_ppl_ratio=3.0), dense + 0.1, dense)
    assert g.passed is True and g.test.startswith("paired bootstrap, ")


def test_examples_that_do_not_pair_name_the_dense_model():
    g = ratio_gate(GateSpec(max_ppl_ratio=3.0), DENSE_NLL + 0.1, DENSE_NLL, digest="other")
    assert g.passed is False and "different contents in the dense model" in g.detail


@pytest.mark.parametrize("shift,within", [(0.1, True), (np.log(3.0), False)])
def test_point_bound_records_its_interval_and_whether_it_holds_over_it(shift, within):
    pruned = DENSE_NLL + shift + RNG.normal(0, 0.02, size=32)
    g = ratio_gate(GateSpec(max_ppl_ratio=3.0, bound="point"), pruned, DENSE_NLL)
    ci = iv.paired_log_ratio(pruned, DENSE_NLL, 0.95)
    assert g.test == "point estimate" and g.interval == ci.text(4) and f"; {ci.text(4)}: " in g.detail
    note = "holds over the whole interval" if within else "the interval crosses the limit: within noise"
    assert g.detail.endswith(note)


def test_interval_bound_records_its_test_and_interval():
    pruned = DENSE_NLL + 0.1
    g = ratio_gate(GateSpec(max_ppl_ratio=3.0), pruned, DENSE_NLL)
    ci = iv.paired_log_ratio(pruned, DENSE_NLL, 0.95)
    assert g.test == f"paired bootstrap, {iv.BOOTSTRAP_ITERS} resamples, seed {iv.BOOTSTRAP_SEED}"
    assert g.interval == ci.text(4) and f"the upper end of its {ci.text(4)} interval is {ci.high:.3f}x" in g.detail


def acc(values, digest="docs"):
    ex = {"zeroshot_boolq_acc": {"kind": "correct", "ids": list(range(len(values))),
                                 "values": [int(v) for v in values], "digest": digest},
          "zeroshot_mean": {"kind": "mean_of", "parts": ["zeroshot_boolq_acc"]}}
    m = {"zeroshot_boolq_acc": float(np.mean(values)), "zeroshot_mean": float(np.mean(values)),
         "sparsity_total": 0.5}
    return m, ex


def test_the_zeroshot_ratio_gate_reads_the_lower_end():
    dense = (RNG.random(400) < 0.6).astype(int)
    m, ex = acc(dense)
    dm, dex = acc(dense)
    res = evaluate_gates(GateSpec(min_zeroshot_ratio=0.9), m, dm, 0.5, examples=ex, dense_examples=dex)
    g = {r.name: r for r in res}["min_zeroshot_ratio"]
    assert g.passed is True and "the lower end of its " in g.detail


def beat(gates, cand, champ):
    (cm, cex), (hm, hex_) = cand, champ
    res = evaluate_gates(gates, cm, {}, 0.5, hm, examples=cex, champion_examples=hex_)
    return {g.name: g for g in res}["beat_champion"]


@pytest.mark.parametrize("lower_is_better,fails", [(False, True), (True, False), (None, False)])
def test_a_gate_whose_direction_contradicts_the_metric_fails_closed(lower_is_better, fails):
    champ = DENSE_NLL
    g = beat(GateSpec(beat_champion="ppl_wikitext2", lower_is_better=lower_is_better),
             (ppl(champ - 0.2), nll_ex(champ - 0.2)), (ppl(champ), nll_ex(champ)))
    if fails:
        assert g.passed is False
        assert g.detail == "ppl_wikitext2: lower is better, but the gate says lower_is_better: False; fix the gate"
    else:
        assert g.passed is True and g.outcome == "better"


def test_a_champion_that_does_not_pair_fails_closed_and_is_named():
    g = beat(GateSpec(beat_champion="ppl_wikitext2"), (ppl(DENSE_NLL), nll_ex(DENSE_NLL, "a")),
             (ppl(DENSE_NLL), nll_ex(DENSE_NLL, "b")))
    assert g.passed is False and g.detail.startswith("cannot compare with the champion: ")
    assert "different contents in the champion" in g.detail


def test_a_tie_says_the_alias_stays_and_records_the_interval():
    cand = DENSE_NLL + np.random.default_rng(3).normal(0, 0.01, size=32)
    g = beat(GateSpec(beat_champion="ppl_wikitext2"), (ppl(cand), nll_ex(cand)), (ppl(DENSE_NLL), nll_ex(DENSE_NLL)))
    ci = iv.paired_log_ratio(cand, DENSE_NLL, 0.95)
    assert g.outcome == "tie" and g.detail.endswith("; the alias stays where it is") and g.interval == ci.text(4)


def test_a_mean_over_tasks_decides_with_exactly_the_minimum_disagreements():
    champ = np.zeros(200, dtype=int)
    champ[:100] = 1
    cand = champ.copy()
    cand[100 : 100 + NEED] = 1  # right on exactly NEED more examples, wrong on none
    g = beat(GateSpec(beat_champion="zeroshot_mean"), acc(cand), acc(champ))
    diff, _ = iv.paired_accuracy([(cand.astype(float), champ.astype(float))], 0.95)
    assert g.outcome == "better" and g.passed is True and g.interval == diff.text(4)
    cand[100 + NEED - 1] = 0  # one short: no decision, and the message says why next to the numbers
    g = beat(GateSpec(beat_champion="zeroshot_mean"), acc(cand), acc(champ))
    assert g.outcome == "tie" and g.detail.startswith("tie within noise at 95%: zeroshot_mean difference")
    assert f"(fewer than {NEED} disagreements cannot decide at 95%)" in g.detail
