"""The statistics behind every interval and paired test, against formulas written out here."""

import math
import random

import numpy as np
import pytest

from wanda_pipeline import intervals as iv
from wanda_pipeline.evaluators.zeroshot import scores


@pytest.mark.parametrize("hits,n", [(7, 20), (1, 2), (0, 5), (133, 277), (500, 500)])
def test_stderr_of_an_accuracy_is_the_binomial_formula(hits, n):
    values = [1] * hits + [0] * (n - hits)
    p = hits / n
    assert iv.mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), abs=1e-12)


def test_stderr_matches_lm_evals_own_function_and_needs_two_values():
    from lm_eval.api.metrics import mean_stderr

    rng = random.Random(3)
    values = [rng.random() for _ in range(37)]
    mean = sum(values) / 37
    by_hand = math.sqrt(sum((v - mean) ** 2 for v in values) / 36) / math.sqrt(37)
    assert iv.mean_stderr(values) == pytest.approx(by_hand, rel=1e-12) == pytest.approx(mean_stderr(values))
    assert math.isnan(iv.mean_stderr([1.0]))


def test_mean_of_tasks_stderr_and_normal_interval():
    se = [0.03, 0.04, 0.012]
    assert iv.mean_of_tasks_stderr(se) == pytest.approx(math.sqrt(0.03**2 + 0.04**2 + 0.012**2) / 3)
    ci = iv.normal_interval(0.5, 0.02, 100, 0.95)
    assert (ci.low, ci.high) == (pytest.approx(0.5 - 1.959964 * 0.02), pytest.approx(0.5 + 1.959964 * 0.02))
    assert iv.z_value(0.90) == pytest.approx(1.644854, rel=1e-6)


def lm_eval_answer(task_hits: dict[str, list[int]]) -> dict:
    """What simple_evaluate(log_samples=True) returns, for the fields the evaluator reads."""
    results, samples = {}, {}
    for task, hits in task_hits.items():
        n, p = len(hits), sum(hits) / len(hits)
        results[task] = {"acc,none": p, "acc_stderr,none": math.sqrt(p * (1 - p) / (n - 1))}
        samples[task] = [{"doc_id": i, "acc": float(h), "doc_hash": f"d{i}", "prompt_hash": "p", "target_hash": "t"}
                         for i, h in reversed(list(enumerate(hits)))]  # any order: the evaluator sorts by id
    return {"results": results, "samples": samples}


def test_zeroshot_scores_carry_stderr_n_and_the_mean_with_its_stderr():
    hits = {"boolq": [1, 0, 1, 1, 0, 1, 1, 0], "rte": [0, 0, 1, 0, 1, 0]}
    metrics, rows, examples = scores(lm_eval_answer(hits), ["boolq", "rte"])
    pb, pr = 5 / 8, 2 / 6
    se_b, se_r = math.sqrt(pb * (1 - pb) / 7), math.sqrt(pr * (1 - pr) / 5)
    assert metrics["zeroshot_boolq_acc_stderr"] == pytest.approx(se_b)
    assert (metrics["zeroshot_boolq_n"], metrics["zeroshot_rte_n"], metrics["zeroshot_mean_n"]) == (8, 6, 14)
    assert metrics["zeroshot_mean"] == pytest.approx((pb + pr) / 2)
    assert metrics["zeroshot_mean_stderr"] == pytest.approx(math.sqrt(se_b**2 + se_r**2) / 2)
    mean_se = math.sqrt(se_b**2 + se_r**2) / 2
    assert metrics["zeroshot_mean_ci_high"] == pytest.approx((pb + pr) / 2 + 1.959964 * mean_se)
    assert examples["zeroshot_boolq_acc"]["values"] == hits["boolq"]
    assert examples["zeroshot_boolq_acc"]["ids"] == list(range(8))
    assert examples["zeroshot_mean"] == {"kind": "mean_of", "parts": ["zeroshot_boolq_acc", "zeroshot_rte_acc"]}
    assert rows[1] == {"task": "rte", "n": 6, "acc": pr, "acc_stderr": pytest.approx(se_r)}


def test_a_task_without_logged_samples_is_not_paired():
    answer = lm_eval_answer({"boolq": [1, 0, 1], "rte": [0, 1, 1, 1]})
    answer["samples"].pop("rte")  # a hub group task logs its samples under its subtasks
    answer["n-samples"] = {"rte": {"effective": 4}}
    metrics, _, examples = scores(answer, ["boolq", "rte"])
    assert metrics["zeroshot_rte_n"] == 4 and set(examples) == {"zeroshot_boolq_acc"}


def test_perplexity_interval_is_a_seeded_bootstrap_close_to_the_delta_method():
    rng = np.random.default_rng(5)
    nll = rng.normal(3.0, 0.4, size=64)
    ci = iv.perplexity_interval(nll, 0.95)
    point = math.exp(nll.mean())
    assert ci.point == pytest.approx(point) and ci.low < point < ci.high and ci.n == 64
    delta = point * nll.std(ddof=1) / math.sqrt(64)  # se of exp(mean) by the delta method
    assert ci.stderr == pytest.approx(delta, rel=0.1)
    assert ci.low == pytest.approx(point * math.exp(-1.96 * delta / point), rel=0.02)
    assert iv.perplexity_interval(nll, 0.95) == ci  # fixed seed: the same interval every time
    assert iv.perplexity_interval(nll, 0.95, seed=1) != ci


def test_paired_bootstrap_uses_one_resample_for_both_models():
    rng = np.random.default_rng(0)
    b = rng.normal(3.0, 0.5, size=40)  # windows vary a lot; the paired difference is exactly 0.1
    ratio = iv.paired_log_ratio(b + 0.1, b, 0.95)
    assert ratio.low == pytest.approx(math.exp(0.1)) and ratio.high == pytest.approx(math.exp(0.1))
    same = [([1, 0, 1, 1], [1, 0, 1, 1]), ([0, 1, 1], [0, 1, 1])]
    diff, r = iv.paired_accuracy(same, 0.95)
    assert (diff.low, diff.high, r.low, r.high) == (0, 0, 1, 1)


@pytest.mark.parametrize("a,b", [(0, 0), (5, 0), (0, 5), (7, 3), (12, 30), (1, 1)])
def test_mcnemar_exact_is_a_two_sided_binomial_test(a, b):
    n = a + b
    if n == 0:
        assert iv.mcnemar_exact(a, b) == 1.0
        return
    pmf = [math.comb(n, i) * 0.5**n for i in range(n + 1)]
    # two-sided: every outcome at most as likely as the one seen
    by_hand = sum(p for p in pmf if p <= pmf[a] * (1 + 1e-12))
    assert iv.mcnemar_exact(a, b) == pytest.approx(min(1.0, by_hand), rel=1e-9)
    assert iv.discordant([1, 1, 0, 0, 1], [0, 1, 1, 0, 0]) == (2, 1)


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99, 0.999])
def test_min_paired_examples_is_the_first_n_whose_best_outcome_reaches_the_confidence(confidence):
    first = next(n for n in range(1, 100) if iv.mcnemar_exact(n, 0) <= 1 - confidence)
    assert iv.min_paired_examples(confidence) == first


def test_summary_rows_fold_stderr_interval_and_n_into_their_metric():
    from wanda_pipeline.console import metric_rows

    metrics = {"ppl_wikitext2": 25.0, "ppl_wikitext2_stderr": 0.3, "ppl_wikitext2_ci_low": 24.4,
               "ppl_wikitext2_ci_high": 25.6, "ppl_wikitext2_n": 32.0, "ppl_wikitext2_tokens": 65536.0,
               "zeroshot_rte_acc": 0.5, "zeroshot_rte_acc_stderr": 0.03, "zeroshot_rte_n": 277.0,
               "sparsity_total": 0.5, "ppl_wikitext2_vs_dense": 1.2}
    assert metric_rows(metrics) == [
        {"metric": "ppl_wikitext2", "value": 25.0, "± stderr": 0.3, "95% interval": "[24.4, 25.6]", "n": 32},
        {"metric": "zeroshot_rte_acc", "value": 0.5, "± stderr": 0.03, "95% interval": "[0.4412, 0.5588]", "n": 277},
        {"metric": "sparsity_total", "value": 0.5},
        {"metric": "ppl_wikitext2_vs_dense", "value": 1.2},
    ]
