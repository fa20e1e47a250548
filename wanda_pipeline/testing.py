"""The pruner conformance kit. A plugin author runs every check on their pruner with::

    from wanda_pipeline.testing import PrunerConformance

    class TestMyPruner(PrunerConformance):
        pruner_class = MyPruner

pytest collects the ``test_*`` methods below. Checks: the exact sparsity is reached in the
declared comparison group, the N:M pattern is respected, weights outside the mask are
untouched, runs are deterministic, bad settings are rejected, and the pruner works inside
the layer engine on a tiny model.

The comparison group is read from the pruner's config field ``group`` (``"output"``: each
output row loses exactly ``int(C_in * s)``; ``"layer"``: the matrix loses exactly
``int(numel * s)``). A pruner without that field declares it as a class attribute
``comparison_group`` (on the pruner or on the test class).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wanda_pipeline.plugins import PrunerConfig

SHAPES = [(16, 64), (24, 40)]
PATTERNS = ["unstructured", "2:4", "4:8"]


def make_stats(names: set[str], weight: torch.Tensor, seed: int = 0, tokens: int = 64) -> dict[str, torch.Tensor]:
    """Statistics a pruner may declare, computed from random activations by plain formulas."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, weight.shape[1], generator=g) * torch.rand(weight.shape[1], generator=g) * 3
    stats = {}
    if "col_sq_norm" in names:
        stats["col_sq_norm"] = (x * x).sum(0) / tokens
    if "gram" in names:
        stats["gram"] = 2.0 / tokens * x.T @ x
    unknown = names - {"col_sq_norm", "gram"}
    if unknown:
        raise ValueError(f"the conformance kit cannot fake statistics {sorted(unknown)}")
    return stats


def random_weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


GROUPS = ("output", "layer")


def expected_pruned(numel_row: int, rows: int, sparsity: float, pattern: str, group: str = "output") -> int:
    """Exact number of pruned weights the pattern and comparison group imply."""
    if pattern != "unstructured":
        n, m = (int(p) for p in pattern.split(":"))
        return rows * (numel_row // m) * n
    if group == "output":
        return rows * int(numel_row * sparsity)
    if group == "layer":
        return int(rows * numel_row * sparsity)
    raise ValueError(f"unknown comparison group {group!r}; use one of {GROUPS}")


def declared_group(pruner: Any, fallback: str | None = None) -> str:
    """The comparison group a pruner declares: config ``group``, else ``comparison_group``."""
    group = getattr(pruner.config, "group", None) or getattr(pruner, "comparison_group", None) or fallback
    if group not in GROUPS:
        raise AssertionError(
            f"{type(pruner).__name__} declares no comparison group (got {group!r}): give its config a "
            f"'group' field or set the class attribute comparison_group to one of {GROUPS}"
        )
    return group


class PrunerConformance:
    """Mix into a pytest test class and set ``pruner_class`` (and ``options`` if needed)."""

    pruner_class: ClassVar[type]
    options: ClassVar[dict[str, Any]] = {}
    patterns: ClassVar[list[str]] = PATTERNS
    sparsities: ClassVar[list[float]] = [0.3, 0.5, 0.7]
    comparison_group: ClassVar[str | None] = None  # for pruners whose config has no ``group``

    def make(self, **overrides):
        return self.pruner_class(self.pruner_class.Config(**{**self.options, **overrides}))

    def run_once(self, pruner, shape, seed=0, sparsity=None):
        weight = random_weight(shape, seed)
        original = weight.clone()
        stats = make_stats(set(pruner.required_stats()), weight, seed)
        s = pruner.config.sparsity if sparsity is None else sparsity
        mask = pruner.prune(weight, stats, s)
        return original, weight, mask

    def test_config_is_strict_pruner_config(self):
        assert issubclass(self.pruner_class.Config, PrunerConfig)
        assert self.pruner_class.Config.model_config.get("extra") == "forbid"

    def test_mask_is_bool_of_weight_shape(self):
        _, weight, mask = self.run_once(self.make(), SHAPES[0])
        assert mask.dtype == torch.bool and mask.shape == weight.shape

    def test_exact_unstructured_sparsity(self):
        for shape in SHAPES:
            for s in self.sparsities:
                pruner = self.make(sparsity=s, pattern="unstructured")
                group = declared_group(pruner, self.comparison_group)
                _, _, mask = self.run_once(pruner, shape, sparsity=s)
                rows, cols = shape
                per_row = mask.sum(1)
                assert int(mask.sum()) == expected_pruned(cols, rows, s, "unstructured", group), (shape, s, group)
                if group == "output":
                    assert bool((per_row == int(cols * s)).all()), "group 'output': every row loses int(C_in*s)"
                else:
                    # One comparison over the whole matrix: on random weights the rows do not all lose the same.
                    assert len(set(per_row.tolist())) > 1, f"group 'layer' but every row lost {per_row[0]}"

    def test_nm_pattern_respected(self):
        for pattern in self.patterns:
            if pattern == "unstructured":
                continue
            n, m = (int(p) for p in pattern.split(":"))
            pruner = self.make(pattern=pattern)
            for shape in SHAPES:
                _, weight, mask = self.run_once(pruner, shape)
                full = (shape[1] // m) * m
                groups = mask[:, :full].reshape(shape[0], -1, m).sum(-1)
                assert bool((groups == n).all()), f"{pattern}: every group of {m} must lose exactly {n}"
                assert int(mask.sum()) == expected_pruned(shape[1], shape[0], 0, pattern)

    def test_weights_outside_mask_untouched(self):
        pruner = self.make()
        original, weight, mask = self.run_once(pruner, SHAPES[0])
        if getattr(pruner, "updates_weights", False):
            # Pruners that reconstruct (SparseGPT) may change kept weights, but every pruned one must be zero.
            assert bool((weight[mask] == 0).all()), "updates_weights pruners must zero what they mask"
            return
        assert torch.equal(weight, original), "prune() must not edit the weight; return the mask"
        applied = original.clone()
        applied[mask] = 0
        assert torch.equal(applied[~mask], original[~mask])

    def test_deterministic(self):
        a = self.run_once(self.make(), SHAPES[1], seed=3)
        b = self.run_once(self.make(), SHAPES[1], seed=3)
        assert torch.equal(a[2], b[2]) and torch.equal(a[1], b[1])

    def test_rejects_bad_settings(self):
        import pytest
        from pydantic import ValidationError

        for bad in ({"sparsity": 1.0}, {"sparsity": -0.1}, {"pattern": "4:2"}, {"pattern": "2:2"},
                    {"pattern": "dense"}, {"no_such_option": 1}):
            with pytest.raises(ValidationError):
                self.pruner_class.Config(**{**self.options, **bad})

    def test_prunes_a_tiny_model_in_the_engine(self):
        from wanda_pipeline.engine import LayerEngine
        from wanda_pipeline.evaluators.sparsity_report import sparsity_table, summarize
        from wanda_pipeline.pruning import prune_model
        from wanda_pipeline.tiny_models import tiny_model

        model = tiny_model("llama", seed=0, layers=2)
        tokens = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
        prune_model(model, tokens, self.make(sparsity=0.5), LayerEngine(progress=False))
        total = summarize(sparsity_table(model))["sparsity_total"]
        assert abs(total - 0.5) < 0.02, total
