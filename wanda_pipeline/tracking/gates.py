"""Quality gates: pure functions over metrics and per-example results, tested without MLflow.

Every gate that compares two models does it on the SAME examples (paired), at
``GateSpec.confidence``; each result says which test decided and with what interval
(docs/evaluation.md):

- ``max_ppl_ratio``: perplexity ratio pruned / dense, paired bootstrap over the windows;
- ``min_zeroshot_ratio``: ratio of the zero-shot means, paired bootstrap stratified by task;
- ``beat_champion``: perplexity as above (ratio < 1 beyond noise), a task's accuracy by the exact
  McNemar test, a mean over tasks by the stratified paired bootstrap of the difference.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from wanda_pipeline import intervals as iv
from wanda_pipeline.config import GateSpec
from wanda_pipeline.per_example import higher_is_better, pair


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str
    test: str = ""  # what decided: "point", "paired bootstrap ...", "exact McNemar ..."
    interval: str = ""  # the interval behind the decision, as text
    outcome: str = ""  # beat_champion: better / tie / worse

    def as_dict(self) -> dict:
        return asdict(self)


SPARSITY_ROUNDING = 0.005
_PPL = re.compile(r"^ppl_[A-Za-z0-9]+$")


def perplexity_key(metrics: dict[str, float]) -> str | None:
    return next((k for k in sorted(metrics) if _PPL.match(k)), None)


def _too_few(groups: list, need: int) -> str:
    n = min(len(a) for a, _ in groups)
    return f"{n} paired examples; a decision at this confidence needs at least {need}" if n < need else ""


def _ratio_gate(name: str, gates: GateSpec, point: float, limit: float, upper: bool, what: str,
                paired: tuple[iv.Interval | None, str]) -> GateResult:
    """A ratio gate: ``upper`` means the ratio must stay at or below ``limit``."""
    ci, problem = paired
    holds = (lambda x: x <= limit) if upper else (lambda x: x >= limit)
    sign = "<=" if upper else ">="
    base = f"{what}: {point:.3f}x dense (limit {sign} {limit}x)"
    if gates.bound == "point":
        if ci is None:
            return GateResult(name, holds(point), f"{base}; no interval: {problem}", "point")
        within = holds(ci.high if upper else ci.low)
        note = "holds over the whole interval" if within else "the interval crosses the limit: within noise"
        return GateResult(name, holds(point), f"{base}; {ci.text(4)}: {note}", "point estimate", ci.text(4))
    if ci is None:
        return GateResult(name, False, f"{base}; cannot bound it at {gates.confidence:.0%}: {problem}",
                          "paired bootstrap")
    end = ci.high if upper else ci.low
    word = "upper" if upper else "lower"
    return GateResult(name, holds(end), f"{base}; the {word} end of its {ci.text(4)} interval is {end:.3f}x",
                      f"paired bootstrap, {iv.BOOTSTRAP_ITERS} resamples, seed {iv.BOOTSTRAP_SEED}", ci.text(4))


def _paired(key: str, examples: dict | None, dense_examples: dict | None, gates: GateSpec, kind: str
            ) -> tuple[iv.Interval | None, str]:
    if not examples or not dense_examples:
        return None, "no per-example results for both the pruned and the dense model"
    groups, problem = pair(key, examples, dense_examples, "the dense model")
    problem = problem or _too_few(groups, iv.min_paired_examples(gates.confidence))
    if problem:
        return None, problem
    if kind == "nll":
        return iv.paired_log_ratio(*groups[0], gates.confidence), ""
    return iv.paired_accuracy(groups, gates.confidence)[1], ""


def beat_champion(gates: GateSpec, key: str, examples: dict, champion_examples: dict) -> GateResult:
    """The paired test of the candidate against the champion on ``key``."""
    name = "beat_champion"
    groups, problem = pair(key, examples, champion_examples, "the champion")
    if problem:
        return GateResult(name, False, f"cannot compare with the champion: {problem}")
    hib = higher_is_better(examples[key], examples)
    if gates.lower_is_better is not None and gates.lower_is_better == hib:
        return GateResult(name, False, f"{key}: {'higher' if hib else 'lower'} is better, but the gate says "
                                       f"lower_is_better: {gates.lower_is_better}; fix the gate")
    c, alpha = gates.confidence, 1 - gates.confidence
    need = iv.min_paired_examples(c)
    stay = "the alias stays where it is"
    entry = examples[key]
    if entry["kind"] == "nll":
        too_few = _too_few(groups, need)
        if too_few:
            return GateResult(name, False, f"{key}: {too_few}")
        ci = iv.paired_log_ratio(*groups[0], c)
        test = f"paired bootstrap over windows, {iv.BOOTSTRAP_ITERS} resamples, seed {iv.BOOTSTRAP_SEED}"
        outcome = "better" if ci.high < 1 else "worse" if ci.low > 1 else "tie"
        said = f"{key} ratio candidate / champion {ci.text(4)}"
    else:
        diff, _ = iv.paired_accuracy(groups, c)
        only_a = only_b = 0
        for a, b in groups:
            x, y = iv.discordant(a, b)
            only_a, only_b = only_a + x, only_b + y
        said = (f"{key} difference candidate - champion {diff.text(4)}; right only for the candidate: {only_a}, "
                f"only for the champion: {only_b}")
        if entry["kind"] == "correct":
            p = iv.mcnemar_exact(only_a, only_b)
            test = f"exact McNemar, p = {p:.4g}"
            outcome = "tie" if p > alpha else ("better" if only_a > only_b else "worse")
        else:
            test = f"paired bootstrap stratified by task, {iv.BOOTSTRAP_ITERS} resamples, seed {iv.BOOTSTRAP_SEED}"
            outcome = "better" if diff.low > 0 else "worse" if diff.high < 0 else "tie"
            if only_a + only_b < need:
                outcome = "tie"
                said += f" (fewer than {need} disagreements cannot decide at {c:.0%})"
        ci = diff
    if outcome == "better":
        return GateResult(name, True, f"better than the champion at {c:.0%}: {said}", test, ci.text(4), outcome)
    if outcome == "tie":
        return GateResult(name, False, f"tie within noise at {c:.0%}: {said}; {stay}", test, ci.text(4), outcome)
    return GateResult(name, False, f"worse than the champion at {c:.0%}: {said}; {stay}", test, ci.text(4), outcome)


def evaluate_gates(gates: GateSpec, metrics: dict[str, float], dense: dict[str, float], target_sparsity: float,
                   champion: dict[str, float] | None = None, *, examples: dict | None = None,
                   dense_examples: dict | None = None, champion_examples: dict | None = None) -> list[GateResult]:
    """Every declared gate, in a fixed order. ``dense`` holds the dense model's metrics under the same
    names; ``champion`` the current champion's (None if there is none). ``*examples``: per-example
    results (:mod:`wanda_pipeline.per_example`) of the candidate, the dense model and the champion."""
    out: list[GateResult] = []
    if gates.max_ppl_ratio is not None:
        key = perplexity_key(metrics)
        if key is None or key not in dense:
            out.append(GateResult("max_ppl_ratio", False, "no perplexity for both the pruned and the dense model"))
        else:
            point = metrics[key] / dense[key]
            out.append(_ratio_gate("max_ppl_ratio", gates, point, gates.max_ppl_ratio, True,
                                   f"{key} {metrics[key]:.3f}, dense {dense[key]:.3f}",
                                   _paired(key, examples, dense_examples, gates, "nll")))
    if gates.min_zeroshot_ratio is not None:
        key = "zeroshot_mean"
        if key not in metrics or key not in dense or dense[key] == 0:
            out.append(GateResult("min_zeroshot_ratio", False, "no zero-shot mean for both models"))
        else:
            point = metrics[key] / dense[key]
            out.append(_ratio_gate("min_zeroshot_ratio", gates, point, gates.min_zeroshot_ratio, False,
                                   f"zero-shot mean {metrics[key]:.4f}, dense {dense[key]:.4f}",
                                   _paired(key, examples, dense_examples, gates, "correct")))
    floor = gates.min_sparsity if gates.min_sparsity is not None else target_sparsity
    got = metrics.get("sparsity_total")
    if got is None:
        out.append(GateResult("min_sparsity", False, "no sparsity measured (add the 'sparsity' evaluator)"))
    else:
        # Per-row pruning rounds down to whole weights (int(C_in * s)), e.g. 0.2986 for 30% of 576 columns.
        out.append(GateResult("min_sparsity", got >= floor - SPARSITY_ROUNDING,
                              f"sparsity {got:.4f} (minimum {floor:.4f}, less {SPARSITY_ROUNDING} for rounding)",
                              "exact count"))
    if gates.beat_champion:
        key = gates.beat_champion
        if key not in metrics:
            out.append(GateResult("beat_champion", False, f"metric {key!r} was not measured"))
        elif champion is None:
            out.append(GateResult("beat_champion", True, f"no current champion; the first one with {key!r} wins"))
        elif not champion_examples:
            out.append(GateResult("beat_champion", False, f"the champion has no per-example results for {key!r} "
                                  f"(a run from before they were kept?), so no paired test is possible; promote by "
                                  f"hand with `wanda-pipeline promote` if you mean to"))
        elif not examples:
            out.append(GateResult("beat_champion", False, f"this run has no per-example results for {key!r}"))
        else:
            out.append(beat_champion(gates, key, examples, champion_examples))
    return out


def gate_tags(gates: GateSpec, results: list[GateResult]) -> dict[str, str]:
    """Model-version tags that record each decision, its test and its interval."""
    tags = {"gates.confidence": f"{gates.confidence:g}", "gates.bound": gates.bound}
    for g in results:
        tags[f"gate.{g.name}"] = "pass" if g.passed else "fail"
        tags[f"gate.{g.name}.detail"] = g.detail
        if g.test:
            tags[f"gate.{g.name}.test"] = g.test
        if g.interval:
            tags[f"gate.{g.name}.interval"] = g.interval
        if g.outcome:
            tags[f"gate.{g.name}.outcome"] = g.outcome
    return tags
