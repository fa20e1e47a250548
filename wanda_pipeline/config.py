"""``pipelines.yaml``: pydantic models, ``${ENV}`` interpolation, defaults, overrides and
whole-file validation that reports every problem with its path in the file."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wanda_pipeline.allocation import AllocationConfig
from wanda_pipeline.errors import ConfigError, PluginError
from wanda_pipeline.models import DTYPES

DEFAULT_FILE = "pipelines.yaml"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    source: str = Field(..., description="demo name, hub id, local folder or .gguf file")
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use one of {sorted(DTYPES)}")
        return v


class CalibrationSpec(_Strict):
    source: str = Field("c4", description="c4, wikitext2, self, or a local .txt/.jsonl file")
    path: str | None = Field(None, description="a local file for a named source")
    nsamples: int = Field(128, gt=0)
    seqlen: int | None = Field(None, gt=0, description="default min(2048, model max)")
    seed: int = 0


class PluginSpec(BaseModel):
    """``name`` plus the plugin's own options, which its Config validates."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EngineSpec(_Strict):
    device: str = "cpu"
    batch_size: int = Field(1, gt=0)
    offload_activations: bool = True
    include: str | None = Field(None, description="regex on linear names inside a block")
    exclude: str | None = None


class GateSpec(_Strict):
    max_ppl_ratio: float | None = Field(None, gt=0, description="perplexity <= this x dense")
    min_zeroshot_ratio: float | None = Field(None, gt=0, description="zero-shot mean >= this x dense")
    min_sparsity: float | None = Field(None, ge=0, le=1, description="achieved sparsity >= this (default: target)")
    beat_champion: str | None = Field(None, description="metric that must beat the current champion's")
    lower_is_better: bool = True


SaveFormat = Literal["hf", "bitmask-v1", "compressed-tensors"]


class RegisterSpec(_Strict):
    enabled: bool = True
    model_name: str | None = Field(None, description="registered model name; default: the pipeline name")
    alias: str = "champion"
    gates: GateSpec = Field(default_factory=GateSpec)
    compressed: bool = Field(True, description="store pruned weights as values + bitmask")
    format: SaveFormat | None = Field(None, description="format of the registered folder; default: "
                                      "bitmask-v1 if compressed else hf; compressed-tensors is what vLLM serves")


class SaveSpec(_Strict):
    path: str
    format: SaveFormat = "hf"


class TrackingSpec(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = "wanda-pipeline"


class ScheduleSpec(_Strict):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        fields = v.split()
        if len(fields) != 5:
            raise ValueError(f"cron {v!r} must have 5 fields (minute hour day month weekday)")
        from prefect.client.schemas.schedules import CronSchedule  # lazy: prefect is slow to import

        try:
            CronSchedule(cron=v)
        except Exception:
            raise ValueError(f"cron {v!r} is not a valid cron expression") from None
        return v


class PipelineSpec(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    description: str = ""
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    pruner: PluginSpec
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    quantizer: PluginSpec | None = None
    evaluators: list[PluginSpec] = Field(default_factory=lambda: [PluginSpec(name="sparsity")])
    dense_baseline: bool = Field(True, description="also evaluate the dense model, for ratios and gates")
    registration: RegisterSpec = Field(default_factory=RegisterSpec, alias="register")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    schedule: ScheduleSpec | None = None
    save: SaveSpec | None = Field(None, description="also write the pruned model: a folder, or {path, format}")

    @field_validator("save", mode="before")
    @classmethod
    def _save_path(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _gates_need_evaluators(self):
        names = {e.name for e in self.evaluators}
        g = self.registration.gates
        if g.max_ppl_ratio is not None and "perplexity" not in names:
            raise ValueError("register.gates.max_ppl_ratio needs a 'perplexity' evaluator")
        if g.min_zeroshot_ratio is not None and "zeroshot" not in names:
            raise ValueError("register.gates.min_zeroshot_ratio needs a 'zeroshot' evaluator")
        return self


class SweepSpec(_Strict):
    pipeline: str
    sparsities: list[float] = Field(default_factory=list)
    pipelines: list[str] = Field(default_factory=list)


class PipelinesFile(_Strict):
    version: Literal[1] = 1
    defaults: dict[str, Any] = Field(default_factory=dict)
    pipelines: dict[str, PipelineSpec]
    sweeps: dict[str, SweepSpec] = Field(default_factory=dict)


def interpolate(value: Any, path: str = "", problems: list[str] | None = None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string."""
    problems = problems if problems is not None else []
    if isinstance(value, dict):
        return {k: interpolate(v, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}.{i}", problems) for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {var} is not set (set it, or write ${{{var}:-default}})")
            return m.group(0)

        return _ENV.sub(sub, value)
    return value


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def _pydantic_problems(exc: ValidationError, prefix: str) -> list[str]:
    out = []
    for e in exc.errors():
        loc = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown option (check the spelling)"
        elif e["type"] == "missing":
            msg = "required but missing"
        out.append(f"{prefix}.{loc}: {msg}" if loc else f"{prefix}: {msg}")
    return out


def parse_document(raw: Any, registry=None, origin: str = DEFAULT_FILE) -> PipelinesFile:
    """Validate a loaded YAML document as a whole; raise one error listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping with a `pipelines:` key")
    problems: list[str] = []
    raw = interpolate(raw, "", problems)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append("defaults: must be a mapping")
        defaults = {}
    pipelines_raw = raw.get("pipelines")
    if not isinstance(pipelines_raw, dict) or not pipelines_raw:
        problems.append("pipelines: required, a mapping of pipeline name -> settings")
        pipelines_raw = {}
    for key in raw:
        if key not in {"version", "defaults", "pipelines", "sweeps"}:
            problems.append(f"{key}: unknown top-level key (expected version, defaults, pipelines, sweeps)")
    if raw.get("version", 1) != 1:
        problems.append(f"version: unsupported version {raw.get('version')!r}; this release reads version 1")

    pipelines: dict[str, PipelineSpec] = {}
    plugin_problems: list[str] = []
    for name, body in pipelines_raw.items():
        prefix = f"pipelines.{name}"
        if not _NAME.match(str(name)):
            problems.append(f"{prefix}: pipeline names use letters, digits, '-', '_' and '.'")
        if not isinstance(body, dict):
            problems.append(f"{prefix}: must be a mapping")
            continue
        merged = deep_merge(defaults, body)
        if registry is not None:
            cfg, plug = check_plugins(merged, registry, prefix)
            problems.extend(cfg)
            plugin_problems.extend(plug)
        try:
            pipelines[str(name)] = PipelineSpec(**merged)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, prefix))

    sweeps: dict[str, SweepSpec] = {}
    for name, body in (raw.get("sweeps") or {}).items():
        try:
            sweep = SweepSpec(**(body or {}))
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, f"sweeps.{name}"))
            continue
        for ref in [sweep.pipeline, *sweep.pipelines]:
            if ref not in pipelines_raw:
                problems.append(f"sweeps.{name}: unknown pipeline {ref!r}")
        for s in sweep.sparsities:
            if not 0 <= s < 1:
                problems.append(f"sweeps.{name}.sparsities: {s} must be in [0, 1)")
        sweeps[str(name)] = sweep

    if problems or plugin_problems:
        all_problems = problems + plugin_problems
        msg = f"{origin} has {len(all_problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in all_problems)
        raise (ConfigError if problems else PluginError)(msg)
    return PipelinesFile(version=1, defaults=defaults, pipelines=pipelines, sweeps=sweeps)


def check_plugins(body: dict, registry, prefix: str) -> tuple[list[str], list[str]]:
    """Every plugin a (merged, raw) pipeline names exists and accepts its options.
    Returns (config problems, plugin problems)."""
    config_problems, plugin_problems = [], []
    entries = [("pruner", "pruner", body.get("pruner"))]
    if body.get("quantizer") is not None:
        entries.append(("quantizer", "quantizer", body.get("quantizer")))
    evaluators = body.get("evaluators", [{"name": "sparsity"}])
    if isinstance(evaluators, list):
        entries += [("evaluator", f"evaluators.{i}", e) for i, e in enumerate(evaluators)]
    for kind, where, plugin in entries:
        if not isinstance(plugin, dict) or not isinstance(plugin.get("name"), str):
            continue  # the schema check reports it
        try:
            cls = registry.get(kind, plugin["name"])
        except PluginError as exc:
            plugin_problems.append(f"{prefix}.{where}.name: {exc}")
            continue
        try:
            cls.Config(**{k: v for k, v in plugin.items() if k != "name"})
        except ValidationError as exc:
            config_problems.extend(_pydantic_problems(exc, f"{prefix}.{where}"))
    return config_problems, plugin_problems


def load_file(path: str | Path = DEFAULT_FILE, registry=None) -> PipelinesFile:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: file not found. Pass --file PATH, or run from the folder that holds pipelines.yaml")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}. Check indentation and quoting.") from None
    return parse_document(raw, registry, origin=str(p))


def apply_overrides(spec: PipelineSpec, overrides: list[str], name: str = "pipeline") -> PipelineSpec:
    """``--set pruner.sparsity=0.6`` style overrides; values parse as YAML."""
    data = spec.model_dump(by_alias=True)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. pruner.sparsity=0.6")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise ConfigError(f"--set {key}: {part!r} is not a mapping")
        leaf = parts[-1]
        parsed = yaml.safe_load(value) if value.strip() else None
        if isinstance(node, list) and leaf.isdigit():
            node[int(leaf)] = parsed
        else:
            node[leaf] = parsed
    try:
        return PipelineSpec(**data)
    except ValidationError as exc:
        raise ConfigError("invalid --set:\n" + "\n".join(f"  - {p}" for p in _pydantic_problems(exc, name))) from None
