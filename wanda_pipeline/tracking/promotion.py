"""The promotion policy as plain code: log the model, read the champion, run the pure gates,
register a version, and move the alias only if EVERY gate passed and the registry answered.

Fail closed: if the champion cannot be read, or the alias cannot be set, no alias moves,
the version (if one was made) is tagged with the reason, and :class:`TrackingError` (exit 6)
tells the caller."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wanda_pipeline.config import RegisterSpec
from wanda_pipeline.errors import TrackingError
from wanda_pipeline.tracking.gates import GateResult, evaluate_gates, gate_tags
from wanda_pipeline.tracking.registry import ModelRegistry


@dataclass
class Decision:
    promote: bool
    reason: str


@dataclass
class Registration:
    name: str
    version: str | None
    alias: str
    promoted: bool
    gates: list[dict] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def decide(gates: list[GateResult], registry_error: str | None = None) -> Decision:
    """Pure: promote only when there is no registry error and every gate passed."""
    if registry_error:
        return Decision(False, f"registry error: {registry_error}")
    failed = [g for g in gates if not g.passed]
    if failed:
        return Decision(False, "; ".join(f"{g.name}: {g.detail}" for g in failed))
    return Decision(True, "passed all gates")


def log_model(tracker, loaded, fmt: str, pipeline: str, sparsity: float | None, write: Callable[[Path], Any]) -> str:
    """Write the model with ``write(folder)`` into a temp folder and log it to the run (the folder
    is the MLflow model's root, so a registered version is directly servable); returns the URI."""
    from wanda_pipeline.saving import folder_bytes

    with tempfile.TemporaryDirectory(prefix="wanda-model-") as root:
        tmp = Path(root) / "model"
        write(tmp)
        stored = folder_bytes(tmp)
        dense_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        tracker.log_metrics({"model_stored_bytes": stored, "model_dense_bytes": dense_bytes,
                             "model_stored_ratio": stored / dense_bytes})
        return tracker.log_model(tmp, metadata={"sparsity": sparsity, "pipeline": pipeline, "format": fmt})


def register_and_promote(tracker, spec: RegisterSpec, pipeline: str, model_uri: str, metrics: dict[str, float],
                         dense: dict[str, float], target_sparsity: float, tags: dict[str, Any], *,
                         examples: dict | None = None, dense_examples: dict | None = None) -> Registration:
    """``examples`` / ``dense_examples``: per-example results of this run and its dense baseline, for
    the paired gates; the champion's are read from its run only when beat_champion needs them."""
    registry = ModelRegistry(tracker)
    name = spec.model_name or pipeline
    champion, champion_examples, registry_error = None, None, None
    try:
        champion = registry.champion_metrics(name, spec.alias)
        if champion is not None and spec.gates.beat_champion:
            champion_examples = registry.champion_examples(name, spec.alias)
    except TrackingError as exc:
        registry_error = str(exc)
    gates = evaluate_gates(spec.gates, metrics, dense, target_sparsity, champion, examples=examples,
                           dense_examples=dense_examples, champion_examples=champion_examples)
    decision = decide(gates, registry_error)
    version_tags = {**tags, **gate_tags(spec.gates, gates), "gates_passed": str(all(g.passed for g in gates)).lower(),
                    "promoted": "false"}
    if not decision.promote:
        version_tags["promotion_blocked_reason"] = decision.reason
    version = registry.register(model_uri, name, version_tags)
    result = Registration(name, version, spec.alias, False, [g.as_dict() for g in gates], decision.reason)
    if registry_error:
        raise TrackingError(f"{name} v{version} registered but NOT promoted: {registry_error}")
    if decision.promote:
        try:
            # tagged first: a version the alias points at always says it was promoted
            if not registry.tag(name, version, {"promoted": "true"}):
                raise TrackingError("could not tag the version as promoted")
            registry.set_alias(name, version, spec.alias, reason=decision.reason, manual=False)
        except TrackingError as exc:
            registry.tag(name, version, {"promoted": "false", "promotion_blocked_reason": f"registry error: {exc}"})
            raise TrackingError(f"{name} v{version} passed every gate but was NOT promoted: {exc}") from exc
        result.promoted = True
    return result
