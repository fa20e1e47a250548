"""Plugin protocols and the entry-point registry.

Pruners, evaluators and quantizers are plain classes with a pydantic ``Config``
(``extra="forbid"``). They are found through the entry-point groups below; the
built-ins register in this project's ``pyproject.toml`` exactly like a third party.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wanda_pipeline.errors import ConfigError, PluginError
from wanda_pipeline.sparsity import parse_pattern, pattern_sparsity

GROUPS = {
    "pruner": "wanda_pipeline.pruners",
    "evaluator": "wanda_pipeline.evaluators",
    "quantizer": "wanda_pipeline.quantizers",
}


class PluginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrunerConfig(PluginConfig):
    """Options every pruner shares; a pruner subclasses this to add its own."""

    sparsity: float = Field(0.5, description="fraction of weights pruned per linear (unstructured)")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M', e.g. '2:4'")

    @field_validator("sparsity")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1), e.g. 0.5")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            parse_pattern(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _nm_fixes_sparsity(self):
        # N:M prunes exactly N of every M, so a different sparsity would be ignored silently.
        nm = parse_pattern(self.pattern)
        if nm and "sparsity" in self.model_fields_set and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(f"pattern {self.pattern!r} prunes exactly {nm[0]}/{nm[1]} = {nm[0] / nm[1]:g}; "
                             f"remove `sparsity` ({self.sparsity:g}) or use pattern 'unstructured'")
        return self

    @property
    def target_sparsity(self) -> float:
        """The sparsity this config actually asks for (N:M fixes it to N/M)."""
        return pattern_sparsity(self.pattern, self.sparsity)


@runtime_checkable
class Pruner(Protocol):
    """Computes a pruning mask for one linear weight (out_features, in_features).

    ``prune`` returns the boolean mask (True = pruned). A pruner that also updates the
    remaining weights (SparseGPT) sets ``updates_weights`` and edits ``weight`` in place.
    """

    Config: ClassVar[type[PrunerConfig]]
    updates_weights: ClassVar[bool]
    config: PrunerConfig

    def required_stats(self) -> set[str]: ...

    def prune(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor], sparsity: float) -> torch.Tensor: ...


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model; returns a flat dict of metrics plus a ``protocol`` dict."""

    Config: ClassVar[type[PluginConfig]]
    config: PluginConfig

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> EvalResult: ...


@runtime_checkable
class Quantizer(Protocol):
    """Quantises one linear weight (out_features, in_features) and returns the new
    (dequantised) weight; the quantize stage applies it layer by layer and checks that
    every pruned zero stays zero.

    A *calibrated* quantizer (gptq) also has ``required_stats() -> set[str]``, as pruners do,
    and takes them: ``quantize_weight(weight, stats)``. It then runs in the prune stage,
    inside the engine's block loop, right after each linear is pruned, on the same
    statistics (:mod:`wanda_pipeline.quantizers.calibrated`)."""

    Config: ClassVar[type[PluginConfig]]
    config: PluginConfig

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor: ...

    def bits_per_weight(self, shape: tuple[int, int]) -> float: ...


@dataclass
class EvalResult:
    metrics: dict[str, float]
    protocol: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    # per-example results behind the metrics (see wanda_pipeline.per_example), for paired comparisons
    examples: dict[str, dict] = field(default_factory=dict)


@dataclass
class PluginInfo:
    kind: str
    name: str
    value: str
    package: str | None
    version: str | None
    cls: type | None = None
    error: str | None = None


@dataclass
class Registry:
    plugins: dict[tuple[str, str], PluginInfo] = field(default_factory=dict)
    broken: list[PluginInfo] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.plugins if k == kind)

    def get(self, kind: str, name: str) -> type:
        info = self.plugins.get((kind, name))
        if info is not None:
            return info.cls
        broken = [b for b in self.broken if b.kind == kind and b.name == name]
        if broken:
            raise PluginError(
                f"{kind} plugin {name!r} is installed but broken: {broken[0].error}. "
                f"Fix or reinstall {broken[0].package or broken[0].value}; `wanda-pipeline plugins` lists all."
            )
        available = ", ".join(self.names(kind)) or "none"
        raise PluginError(
            f"unknown {kind} {name!r}; available: {available}. Install the package that provides it, "
            f"or check the spelling (`wanda-pipeline plugins` lists what is installed)."
        )

    def create(self, kind: str, name: str, options: Mapping[str, Any] | None = None) -> Any:
        cls = self.get(kind, name)
        try:
            config = cls.Config(**dict(options or {}))
        except ValidationError as exc:
            allowed = ", ".join(cls.Config.model_fields)
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or name}: "
                + (f"unknown option (check the spelling; {name} takes: {allowed})" if e["type"] == "extra_forbidden"
                   else e["msg"].removeprefix("Value error, ")) for e in exc.errors())
            raise ConfigError(f"{kind} {name!r} options are invalid: {problems}") from None
        return cls(config)


def _load(kind: str, ep: EntryPoint) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    info = PluginInfo(
        kind=kind, name=ep.name, value=ep.value,
        package=dist.metadata["Name"] if dist else None, version=dist.version if dist else None,
    )
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must not break the others
        info.error = f"{type(exc).__name__}: {exc}"
        return info
    config_cls = getattr(cls, "Config", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, BaseModel)):
        info.error = "plugin class has no pydantic `Config` class attribute"
    else:
        info.cls = cls
    return info


def discover() -> Registry:
    """Load every plugin from its entry point; report broken ones and duplicate names."""
    registry = Registry()
    for kind, group in GROUPS.items():
        for ep in entry_points(group=group):
            info = _load(kind, ep)
            key = (kind, ep.name)
            if info.error:
                registry.broken.append(info)
            elif key in registry.plugins and registry.plugins[key].value != info.value:
                first = registry.plugins.pop(key)
                msg = f"name registered twice: by {first.package} ({first.value}) and {info.package} ({info.value})"
                for dup in (first, info):
                    dup.error, dup.cls = msg, None
                    registry.broken.append(dup)
            elif not any(b.kind == kind and b.name == ep.name for b in registry.broken):
                registry.plugins[key] = info
    return registry
