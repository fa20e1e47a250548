"""Reading ``pipelines.yaml``: a YAML loader that rejects duplicate keys, ``${ENV}``
interpolation, defaults, overrides, and whole-file validation that reports every problem
with its path in the file."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from wanda_pipeline.config import DEFAULT_FILE, PipelinesFile, PipelineSpec, SweepSpec
from wanda_pipeline.errors import ConfigError, PluginError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (YAML would keep the last)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line {seen[key]}); "
                f"YAML would silently keep only the last one. Rename or remove one of them."
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def safe_load_unique(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


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
        raw_sweep = body if isinstance(body, dict) else {}  # references are checked even if the rest is wrong
        others = raw_sweep.get("pipelines") if isinstance(raw_sweep.get("pipelines"), list) else []
        problems += [f"sweeps.{name}: unknown pipeline {r!r}" for r in [raw_sweep.get("pipeline"), *others]
                     if isinstance(r, str) and r not in pipelines_raw]
        try:
            sweep = SweepSpec(**(body or {}))
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, f"sweeps.{name}"))
            continue
        body = pipelines_raw.get(sweep.pipeline)
        if registry is not None and isinstance(body, dict):
            for i, s in enumerate(sweep.sparsities):  # each point is checked by the pruner's own Config
                point = deep_merge(deep_merge(defaults, body), {"pruner": {"sparsity": s}})
                cfg, _ = check_plugins({"pruner": point.get("pruner"), "evaluators": []}, registry,
                                       f"sweeps.{name}.sparsities.{i}")
                problems.extend(cfg)
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
        raw = safe_load_unique(p.read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
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
        parsed = safe_load_unique(value) if value.strip() else None
        if isinstance(node, list) and leaf.isdigit():
            node[int(leaf)] = parsed
        else:
            node[leaf] = parsed
    try:
        return PipelineSpec(**data)
    except ValidationError as exc:
        raise ConfigError("invalid --set:\n" + "\n".join(f"  - {p}" for p in _pydantic_problems(exc, name))) from None


def pipeline_spec(doc: PipelinesFile, name: str, overrides: list[str] | None = None) -> PipelineSpec:
    if name not in doc.pipelines:
        raise ConfigError(f"no pipeline named {name!r}; available: {', '.join(sorted(doc.pipelines))}")
    spec = doc.pipelines[name]
    return apply_overrides(spec, overrides, f"pipelines.{name}") if overrides else spec


def sweep_overrides(doc: PipelinesFile, name: str, overrides: list[str]) -> PipelinesFile:
    """The file with ``sweep NAME --set key=value`` applied to every pipeline the sweep runs."""
    if name not in doc.sweeps or not overrides:
        return doc
    sw = doc.sweeps[name]
    if sw.sparsities and any(o.split("=", 1)[0].strip() == "pruner.sparsity" for o in overrides):
        raise ConfigError(f"--set pruner.sparsity: sweep {name!r} sets the sparsity of each point "
                          f"({sw.sparsities}); change `sparsities` in the file instead")
    pipelines = dict(doc.pipelines)
    for p in {sw.pipeline, *sw.pipelines} & set(pipelines):
        pipelines[p] = apply_overrides(pipelines[p], overrides, f"pipelines.{p}")
    return doc.model_copy(update={"pipelines": pipelines})


def sweep_points(doc: PipelinesFile, name: str) -> list[dict]:
    """The points of a sweep as ``{"pipeline": label, "spec": dict}`` (what the sweep flow takes)."""
    if name not in doc.sweeps:
        raise ConfigError(f"no sweep named {name!r}; available: {', '.join(sorted(doc.sweeps)) or 'none'}")
    sw = doc.sweeps[name]
    points = []
    for p in [sw.pipeline, *sw.pipelines]:
        base = doc.pipelines[p]
        grid = sw.sparsities if (p == sw.pipeline and sw.sparsities) else [None]
        for s in grid:
            spec = apply_overrides(base, [f"pruner.sparsity={s}"], f"sweeps.{name}") if s is not None else base
            label = f"{p}-s{s:g}" if s is not None else p
            points.append({"pipeline": label, "spec": spec.model_dump(by_alias=True)})
    labels = [p["pipeline"] for p in points]
    if not points or len(set(labels)) != len(labels):  # points are told apart by label (runs, tables)
        raise ConfigError(f"sweeps.{name}: its points {labels} are empty or not distinct; list each sparsity "
                          f"(distinct to 6 digits) and each pipeline once")
    return points
