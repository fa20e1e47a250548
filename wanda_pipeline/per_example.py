"""Per-example results: what two runs need to be compared example by example.

An evaluator returns them in ``EvalResult.examples``, keyed by the metric they stand behind:

- ``{"kind": "nll", "ids": [window...], "values": [mean NLL of each window], "digest": ...}``
- ``{"kind": "correct", "ids": [lm-eval doc_id...], "values": [0 or 1...], "digest": ...}``
- ``{"kind": "mean_of", "parts": [metric...]}`` (an equal-weight mean of other metrics)

``digest`` fingerprints WHAT was scored (the token ids of the windows; lm-eval's doc, prompt and
target hashes), so two runs pair up only when they scored the very same examples. The run keeps
them as the artifact :data:`ARTIFACT` (and :data:`DENSE_ARTIFACT` for the dense baseline).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

ARTIFACT = "examples.json"
DENSE_ARTIFACT = "dense_examples.json"
FORMAT = "wanda-pipeline/examples-v1"


def digest(parts: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def document(examples: Mapping[str, dict]) -> dict:
    """The artifact's JSON body."""
    return {"format": FORMAT, "metrics": dict(examples)}


def from_document(doc: Any) -> dict[str, dict] | None:
    """The examples of an artifact body, or None if it is not one this version reads."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("metrics"), dict):
        return None
    return doc["metrics"]


def higher_is_better(entry: dict, examples: Mapping[str, dict]) -> bool:
    if entry.get("kind") == "mean_of":
        return higher_is_better(examples[entry["parts"][0]], examples)
    return entry.get("kind") == "correct"


def pair(metric: str, a: Mapping[str, dict], b: Mapping[str, dict], who: str = "the other run"
         ) -> tuple[list[tuple[list[float], list[float]]], str]:
    """The groups of paired values of ``metric`` (one group per task / text), aligned by id.

    Returns (groups, problem): ``problem`` is "" when they pair, else a sentence saying why not."""
    if metric not in a:
        return [], f"{metric!r} has no per-example results in this run"
    if metric not in b:
        return [], f"{who} has no per-example results for {metric!r}"
    ea, eb = a[metric], b[metric]
    if ea.get("kind") == "mean_of":
        if eb.get("kind") != "mean_of" or list(eb.get("parts", [])) != list(ea["parts"]):
            return [], f"{metric!r} is a mean over other tasks in {who} ({eb.get('parts')} vs {ea['parts']})"
        groups: list[tuple[list[float], list[float]]] = []
        if not ea["parts"]:
            return [], f"{metric!r} is a mean over no tasks"
        for part in ea["parts"]:
            g, problem = pair(part, a, b, who)
            if problem:
                return [], problem
            groups += g
        return groups, ""
    if ea.get("kind") != eb.get("kind"):
        return [], f"{metric!r} is {ea.get('kind')!r} here but {eb.get('kind')!r} in {who}"
    ids_a, ids_b = list(ea["ids"]), list(eb["ids"])
    if sorted(ids_a) != sorted(ids_b):
        return [], (f"{metric!r} was scored on {len(ids_a)} examples here and {len(ids_b)} in {who}, not the same "
                    f"ones; evaluate both with the same protocol (limit, windows, seqlen)")
    if ea.get("digest") != eb.get("digest"):
        return [], (f"{metric!r}: the examples have the same ids but different contents in {who} (another data "
                    f"file, tokenizer or prompt); they cannot be paired")
    if not ids_a:
        return [], f"{metric!r} has no examples"
    by_id = dict(zip(ids_b, eb["values"], strict=True))
    return [([float(v) for v in ea["values"]], [float(by_id[i]) for i in ids_a])], ""
