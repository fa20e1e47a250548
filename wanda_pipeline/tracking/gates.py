"""Quality gates: pure functions over metrics, so they are tested without MLflow."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wanda_pipeline.config import GateSpec


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


SPARSITY_ROUNDING = 0.005


def perplexity_key(metrics: dict[str, float]) -> str | None:
    return next((k for k in sorted(metrics) if k.startswith("ppl_")), None)


def evaluate_gates(
    gates: GateSpec,
    metrics: dict[str, float],
    dense: dict[str, float],
    target_sparsity: float,
    champion: dict[str, float] | None = None,
) -> list[GateResult]:
    """Every declared gate, in a fixed order. ``dense`` holds the dense model's metrics
    under the same names; ``champion`` the current champion's (None if there is none)."""
    out: list[GateResult] = []
    if gates.max_ppl_ratio is not None:
        key = perplexity_key(metrics)
        if key is None or key not in dense:
            out.append(GateResult("max_ppl_ratio", False, "no perplexity for both the pruned and the dense model"))
        else:
            ratio = metrics[key] / dense[key]
            out.append(GateResult("max_ppl_ratio", ratio <= gates.max_ppl_ratio,
                                  f"{key} {metrics[key]:.3f} is {ratio:.3f}x dense {dense[key]:.3f} "
                                  f"(limit {gates.max_ppl_ratio}x)"))
    if gates.min_zeroshot_ratio is not None:
        key = "zeroshot_mean"
        if key not in metrics or key not in dense or dense[key] == 0:
            out.append(GateResult("min_zeroshot_ratio", False, "no zero-shot mean for both models"))
        else:
            ratio = metrics[key] / dense[key]
            out.append(GateResult("min_zeroshot_ratio", ratio >= gates.min_zeroshot_ratio,
                                  f"zero-shot mean {metrics[key]:.4f} is {ratio:.3f}x dense {dense[key]:.4f} "
                                  f"(minimum {gates.min_zeroshot_ratio}x)"))
    floor = gates.min_sparsity if gates.min_sparsity is not None else target_sparsity
    got = metrics.get("sparsity_total")
    if got is None:
        out.append(GateResult("min_sparsity", False, "no sparsity measured (add the 'sparsity' evaluator)"))
    else:
        # Per-row pruning rounds down to whole weights (int(C_in * s)), e.g. 0.2986 for 30% of 576 columns.
        out.append(GateResult("min_sparsity", got >= floor - SPARSITY_ROUNDING,
                              f"sparsity {got:.4f} (minimum {floor:.4f}, less {SPARSITY_ROUNDING} for rounding)"))
    if gates.beat_champion:
        key = gates.beat_champion
        if key not in metrics:
            out.append(GateResult("beat_champion", False, f"metric {key!r} was not measured"))
        elif not champion or key not in champion:
            out.append(GateResult("beat_champion", True, f"no current champion with {key!r}; first one wins"))
        else:
            better = metrics[key] < champion[key] if gates.lower_is_better else metrics[key] > champion[key]
            word = "lower" if gates.lower_is_better else "higher"
            out.append(GateResult("beat_champion", better,
                                  f"{key} {metrics[key]:.4f} vs champion {champion[key]:.4f} ({word} is better)"))
    return out
