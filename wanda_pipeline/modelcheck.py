"""What a model's config promises, checked on a meta-device skeleton (no weight is read): the
safetensors tensors cover its parameters by name and shape and hold nothing else; the
include/exclude patterns select some linears; per-layer ratios name blocks that exist."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from wanda_pipeline.allocation import AllocationConfig
from wanda_pipeline.config import EngineSpec, ModelSpec
from wanda_pipeline.errors import ConfigError, DataError, WandaPipelineError
from wanda_pipeline.models import find_blocks, find_linears
from wanda_pipeline.sourcecheck import SourceFacts

SHOWN = 4  # names listed in a message


def skeleton(facts: SourceFacts, spec: ModelSpec) -> tuple[nn.Module | None, list[WandaPipelineError]]:
    """The model on the meta device, from its config.json (or the GGUF's metadata)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if facts.config_dir is not None:
        where, kwargs = facts.config_dir / "config.json", {}
        folder = facts.config_dir
    elif facts.gguf is not None:
        where, kwargs, folder = facts.gguf, {"gguf_file": facts.gguf.name}, facts.gguf.parent
    else:
        return None, []  # a hub id: its config is not here yet
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code, **kwargs)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
        model.tie_weights()
    except Exception as exc:  # what the load would fail on, minutes later
        return None, [DataError(f"{where}: transformers cannot build a causal LM from it ({type(exc).__name__}: "
                                f"{str(exc)[:300]}); fix or re-download the model's config")]
    return model, []


def _sample(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")


def _dims(shape) -> str:
    return "x".join(map(str, shape)) or "a scalar"


def selection_problems(blocks: nn.ModuleList, engine: EngineSpec) -> list[WandaPipelineError]:
    """include/exclude that leave no linear to prune would save the dense model as the pruned one."""
    include, exclude = engine.include, engine.exclude
    if not include and not exclude:
        return []
    if any(find_linears(b, include, exclude) for b in blocks):
        return []
    names = list(find_linears(blocks[0]))
    included = list(find_linears(blocks[0], include))
    fix = "nothing would be pruned. Patterns are regexes searched in linear names inside a block, e.g. " \
          f"{names[-1]!r}" if names else "nothing would be pruned"
    if include and not included:
        return [ConfigError(f"engine.include (--include) {include!r} matches 0 of the {len(names)} linears of "
                            f"each block ({_sample(names)}); {fix}")]
    return [ConfigError(f"engine.exclude (--exclude) {exclude!r} excludes all {len(included)} linears "
                        f"{'that include matches ' if include else ''}in each block ({_sample(included)}); {fix}")]


def allocation_problems(allocation: AllocationConfig, n_blocks: int) -> list[WandaPipelineError]:
    bad = sorted(k for k in (allocation.ratios or {}) if not 0 <= k < n_blocks) if allocation.method == "per_layer" \
        else []
    if bad:
        return [ConfigError(f"allocation.ratios names blocks {bad}, but the model has blocks 0..{n_blocks - 1} "
                            f"(config.json); fix the block indices")]
    return []


def header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from safetensors headers only."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return shapes


def _renamer(model: nn.Module):
    """Checkpoint key -> model key as transformers renames it at load (legacy names, base-model prefix,
    per-family renamings); None for keys a converter merges (their shapes change)."""
    expected = model.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except ImportError:  # another transformers: compare names as they are, with the prefix rule
        renamings = converters = None
    prefix = getattr(model, "base_model_prefix", "")

    def rename(key: str) -> tuple[str, bool]:
        if renamings is not None:
            name, merged = rename_source_key(key, renamings, converters, prefix, expected)
            return name, merged is not None
        if prefix and key not in expected and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}", False
        return key, False

    return rename


def coverage_problems(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: Path) -> list[WandaPipelineError]:
    """The checkpoint's tensors against the model's parameters: missing, unexpected, other shape."""
    expected = model.state_dict()
    ignore_missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    ignore_extra = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    rename = _renamer(model)
    found, unexpected, wrong = set(), [], []
    for key, shape in shapes.items():
        name, merged = rename(key)
        if name in expected:
            found.add(name)
            if not merged and tuple(expected[name].shape) != shape:
                wrong.append(f"{key} is {_dims(shape)} in the weights, {_dims(expected[name].shape)} in config.json")
        elif not merged and not any(p.search(name) for p in ignore_extra):
            unexpected.append(key)
    groups: dict[int, list[str]] = {}  # tied parameters are one tensor under several names
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    missing = [g[0] for g in groups.values()
               if not found & set(g) and not any(p.search(n) for p in ignore_missing for n in g)]
    if not (missing or unexpected or wrong):
        return []
    return [mismatch_error(where, missing, unexpected, wrong, _block_counts(model, shapes, rename))]


def mismatch_error(where, missing: list[str], unexpected: list[str], wrong: list[str] | None = None,
                   blocks: str = "") -> DataError:
    """One message for weights that do not fit the config (from headers in preflight, or at load)."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) the config needs are not in the weights ({_sample(missing)}); "
                     f"transformers would initialise them randomly")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the weights are not in the model ({_sample(unexpected)}); "
                     f"transformers would drop them")
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) have another shape ({_sample(wrong)})")
    return DataError(f"model {where}: its weights do not match its config.json{blocks}: " + "; ".join(parts)
                     + ". Use the config.json that came with these weights, or re-save / re-download the model")


def _block_counts(model: nn.Module, shapes: dict, rename) -> str:
    try:
        path, blocks = find_blocks(model)
    except ConfigError:
        return ""
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    held = {m.group(1) for k in shapes if (m := pattern.match(rename(k)[0]))}
    return f" (config.json: {len(blocks)} decoder blocks, the weights: {len(held)})" if len(held) != len(blocks) else ""


def model_problems(spec, facts: SourceFacts, weights: bool = True) -> list[WandaPipelineError]:
    """Everything this module checks, for one pipeline; ``weights=False``: the config-only part."""
    if spec.engine.stream and (facts.gguf or (facts.config_dir and not any(f.suffix == ".safetensors"
                                                                          for f in facts.files))):
        return [ConfigError(f"engine.stream (--stream) reads safetensors shards block by block, and "
                            f"{facts.gguf or facts.config_dir} has none; drop --stream, or convert the model to "
                            f"safetensors first")]
    selecting = spec.engine.include or spec.engine.exclude or spec.allocation.method == "per_layer"
    files = [f for f in facts.files if f.suffix == ".safetensors"] if weights and facts.config_dir else []
    if not selecting and not files:
        return []  # a GGUF's config costs seconds to build; build it only when there is something to check
    model, problems = skeleton(facts, spec.model)
    if model is None:
        return problems
    try:
        _, blocks = find_blocks(model)
    except ConfigError as exc:
        return [exc]
    problems += selection_problems(blocks, spec.engine) + allocation_problems(spec.allocation, len(blocks))
    if files:
        problems += coverage_problems(model, header_shapes(files), facts.config_dir)
    return problems
