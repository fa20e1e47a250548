"""Sparsity per linear layer, per block and in total."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from wanda_pipeline.engine.source import iter_blocks
from wanda_pipeline.models import find_linears, linear_weight_view
from wanda_pipeline.plugins import EvalResult, PluginConfig


class SparsityConfig(PluginConfig):
    include: str | None = None
    exclude: str | None = None


def sparsity_table(model: nn.Module, include: str | None = None, exclude: str | None = None) -> list[dict]:
    rows = []
    for i, block in iter_blocks(model):  # a streamed model's blocks are read one at a time
        for name, lin in find_linears(block, include, exclude).items():
            w = linear_weight_view(lin)
            zeros = int((w == 0).sum())
            rows.append({"block": i, "linear": name, "numel": w.numel(), "zeros": zeros,
                         "sparsity": zeros / w.numel()})
    return rows


def summarize(rows: list[dict]) -> dict[str, float]:
    numel = sum(r["numel"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    out = {"sparsity_total": zeros / numel if numel else 0.0}
    for block in sorted({r["block"] for r in rows}):
        b = [r for r in rows if r["block"] == block]
        out[f"sparsity_block_{block:03d}"] = sum(r["zeros"] for r in b) / sum(r["numel"] for r in b)
    return out


class SparsityEvaluator:
    Config: ClassVar[type[SparsityConfig]] = SparsityConfig

    def __init__(self, config: SparsityConfig | None = None):
        self.config = config or SparsityConfig()

    def evaluate(self, model: nn.Module, tokenizer: Any) -> EvalResult:
        rows = sparsity_table(model, self.config.include, self.config.exclude)
        return EvalResult(metrics=summarize(rows), protocol={"scope": "linears in decoder blocks"},
                          tables={"sparsity_per_layer": rows})
