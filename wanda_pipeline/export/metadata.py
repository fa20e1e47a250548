"""Sparsity metadata of a pruned model, as compressed-tensors' legacy ``dense`` sparsity
config (fields ``format``, ``sparsity_structure``, ``global_sparsity``, ``targets``,
``ignore``) plus a few checked facts.

It is written to ``config.json`` under the top-level key ``wanda_sparsity``, never inside
``quantization_config.sparsity_config``: vLLM >= 0.19 rejects any ``sparsity_config`` with
targets, even ``format: dense`` (vllm-project/vllm#51188), and compressed-tensors 0.20
writes that field empty. Loaders ignore unknown top-level config keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.sparsity import parse_pattern

CONFIG_KEY = "wanda_sparsity"


def follows_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every run of ``m`` consecutive input columns of every row holds at least ``n`` zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=-1)
    return bool((zeros >= n).all())


def sparsity_metadata(model: nn.Module, pattern: str = "unstructured", include: str | None = None,
                      exclude: str | None = None) -> dict[str, Any]:
    """Measure the pruned linears (decoder-block linears passing include/exclude) of ``model``.

    ``sparsity_structure`` is the requested pattern if every target really follows it
    (checked here); otherwise "unstructured". ``linears`` gives the same per target, with its
    sparsity."""
    path, blocks = find_blocks(model)
    linears: dict[str, dict[str, Any]] = {}
    zeros = numel = 0
    nm = parse_pattern(pattern)
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block, include, exclude).items():
            w = linear_weight_view(lin)
            z = int((w == 0).sum())
            follows = nm is not None and follows_pattern(w, *nm)
            linears[f"{path}.{i}.{name}"] = {"sparsity": z / w.numel(), "structure": pattern if follows
                                             else "unstructured"}
            zeros += z
            numel += w.numel()
    # nothing measured claims no structure
    holds = nm is not None and bool(linears) and all(v["structure"] == pattern for v in linears.values())
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears]
    return {
        "format": "dense",
        "sparsity_structure": pattern if holds else "unstructured",
        "requested_pattern": pattern,
        "global_sparsity": zeros / numel if numel else 0.0,
        "targets": list(linears),
        "ignore": ignore,
        "linears": linears,  # per target: its own sparsity and whether it follows the pattern
    }


def validated(meta: dict[str, Any]) -> dict[str, Any]:
    """Check the legacy fields with compressed-tensors' own ``DenseSparsityConfig``."""
    from compressed_tensors.config import DenseSparsityConfig

    core = DenseSparsityConfig.model_validate(meta).model_dump()
    return {**meta, **core}
