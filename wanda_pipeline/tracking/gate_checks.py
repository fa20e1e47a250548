"""Gates that can never pass, found before anything runs (``validate`` and preflight).

A gate that compares two models needs per-example results for its metric (so the evaluator
must keep them) and enough paired examples to reach its confidence at all: with n pairs the
most lopsided outcome has exact p = 2 * 0.5^n (:func:`wanda_pipeline.intervals.min_paired_examples`).
"""

from __future__ import annotations

from typing import Any

from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.intervals import min_paired_examples


def _paired_metrics(evaluators: dict[str, Any]) -> dict[str, tuple[bool, str, int | None]]:
    """metric -> (higher is better, evaluator key, examples per task or text; None: all there are)."""
    out = {}
    for key, ev in evaluators.items():
        names = getattr(ev, "per_example_metrics", None)
        if names is None:
            continue
        per_group = ev.examples_per_group() if hasattr(ev, "examples_per_group") else None
        out.update({m: (hib, key, per_group) for m, hib in names().items()})
    return out


def gate_problems(spec: PipelineSpec, evaluators: dict[str, Any]) -> list[ConfigError]:
    """Each impossible gate as a ConfigError (exit 2) naming the gate, the reason and the fix."""
    reg = spec.registration
    if not reg.enabled:
        return []
    g = reg.gates
    need = min_paired_examples(g.confidence)
    paired = _paired_metrics(evaluators)
    problems = []

    def too_few(gate: str, key: str, n: int | None, setting: str) -> None:
        if n is None or n >= need:
            return
        unit = "windows" if setting == "windows" else "examples per task"
        point = ", use gates.bound: point" if gate != "beat_champion" else ""
        problems.append(ConfigError(
            f"register.gates.{gate}: evaluator {key!r} scores at most {n} {unit}; no paired test reaches "
            f"confidence {g.confidence:g} with fewer than {need} (the best exact p of n pairs is 2 x 0.5^n). "
            f"Set its `{setting}` to at least {need}{point}, or lower gates.confidence"))

    if g.beat_champion:
        if g.beat_champion not in paired:
            problems.append(ConfigError(
                f"register.gates.beat_champion: {g.beat_champion!r} is not a metric any evaluator of this pipeline "
                f"keeps per-example results for, so no paired test can decide it; use one of: "
                f"{', '.join(sorted(paired)) or 'none (add a perplexity or zeroshot evaluator)'}"))
        else:
            hib, key, n = paired[g.beat_champion]
            if g.lower_is_better is not None and g.lower_is_better == hib:
                problems.append(ConfigError(
                    f"register.gates.lower_is_better: {g.lower_is_better} contradicts {g.beat_champion!r}, where "
                    f"{'higher' if hib else 'lower'} is better; remove lower_is_better (it follows the metric)"))
            too_few("beat_champion", key, n, "limit" if hib else "windows")
    if g.bound == "interval":
        for gate, metric_prefix, what in (("max_ppl_ratio", "ppl_", "windows"),
                                          ("min_zeroshot_ratio", "zeroshot_mean", "limit")):
            if getattr(g, gate) is None:
                continue
            hit = next(((key, n) for m, (_, key, n) in paired.items() if m.startswith(metric_prefix)), None)
            if hit:
                too_few(gate, hit[0], hit[1], what)
    return problems
