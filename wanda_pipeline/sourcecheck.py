"""Cheap checks of model and data files, without loading a model: headers, sizes, configs."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wanda_pipeline.config import ModelSpec
from wanda_pipeline.errors import ConfigError, DataError, WandaPipelineError
from wanda_pipeline.models import DEMO_MODELS


@dataclass
class SourceFacts:
    """What the files say about a model, before it is loaded."""

    folder: Path | None = None  # local folder (or the GGUF's folder)
    files: list[Path] = field(default_factory=list)  # what a load reads
    max_positions: int | None = None
    weight_bytes: int = 0
    config_dir: Path | None = None  # a folder whose config.json describes the model (None: GGUF or hub)
    gguf: Path | None = None

    def contains(self, path: Path) -> bool:
        """True if ``path`` is one of the model's files or overlaps its folder."""
        p = path.expanduser().resolve()
        if any(p == f.resolve() for f in self.files):
            return True
        if self.folder is None:
            return False
        src = self.folder.resolve()
        return p == src or src in p.parents or p in src.parents


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def check_safetensors(path: Path) -> str | None:
    """None if the file's header is whole and every tensor fits in the file; else what is wrong."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                return "the header is cut off"
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "it is not a safetensors file"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"it is truncated ({size} bytes, the header needs {8 + n + end})"
    return None


def _check_folder(path: Path, facts: SourceFacts) -> list[WandaPipelineError]:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        return [DataError(f"{path} has no config.json; point `model` at a saved transformers folder or a .gguf")]
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        return [DataError(f"{cfg_path} is not readable JSON ({exc}); re-save or re-download the model")]
    facts.max_positions = _max_positions(config)
    facts.config_dir = path
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        return [DataError(f"{path} has no weights (*.safetensors or *.bin); re-save or re-download the model")]
    facts.files += [cfg_path, *weights]
    facts.weight_bytes = sum(w.stat().st_size for w in weights)
    problems: list[WandaPipelineError] = _check_index(path)
    for w in weights:
        if not os.access(w, os.R_OK):
            problems.append(DataError(f"{w} is not readable; fix its permissions"))
        elif w.suffix == ".safetensors" and (bad := check_safetensors(w)):
            problems.append(DataError(f"model file {w} is corrupt: {bad}. Re-save or re-download the model"))
    return problems


def _check_index(folder: Path) -> list[WandaPipelineError]:
    """A sharded checkpoint's index names shards that are there."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return []
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [DataError(f"{index} is not a readable shard index ({type(exc).__name__}: {exc}); re-download it")]
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        return [DataError(f"{index} names {len(missing)} shard(s) that are not in {folder} ({', '.join(missing[:4])}); "
                          f"download the missing shards or re-save the model")]
    return []


def _check_gguf(path: Path, facts: SourceFacts) -> list[WandaPipelineError]:
    if not path.exists():
        return [DataError(f"GGUF file {path} does not exist; check the model path")]
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            return [DataError(f"{path} is not a GGUF file (bad magic bytes); re-download it")]
    facts.folder, facts.files, facts.gguf = path.parent, [path], path
    facts.weight_bytes = path.stat().st_size * 8  # dequantised to float32: about 8x a 4-bit file
    return gguf_problems(path, facts)


def gguf_problems(path: Path, facts: SourceFacts) -> list[WandaPipelineError]:
    """The GGUF's header, metadata and tensor table (the gguf library maps the file; no weight is read)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as SUPPORTED

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader fails on a cut-off header, metadata or tensor table
        return [DataError(f"GGUF file {path} is corrupt or truncated ({type(exc).__name__}: {exc}); re-download it")]

    def field(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = field("general.architecture")
    if not reader.tensors:
        return [DataError(f"GGUF file {path} holds no tensors; re-download it")]
    # llama.cpp spells a few names otherwise (qwen2moe, gpt-oss, t5encoder); transformers maps them
    spelled = str(arch).replace("-", "_").replace("2moe", "2_moe").replace("3moe", "3_moe")
    if arch not in SUPPORTED and spelled not in SUPPORTED and "t5" not in str(arch):
        return [DataError(f"GGUF file {path} has architecture {arch!r}, which transformers cannot load from GGUF "
                          f"(it can: {', '.join(sorted(set(SUPPORTED) - {'general', 'tokenizer'}))}); "
                          f"convert the model to a safetensors folder")]
    context = field(f"{arch}.context_length")
    facts.max_positions = context if isinstance(context, int) and context > 0 else None
    problems: list[WandaPipelineError] = []
    blocks = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    declared = field(f"{arch}.block_count")
    if declared is not None and declared != len(blocks):
        problems.append(DataError(f"GGUF file {path}: its metadata says {arch}.block_count={declared}, but its "
                                  f"tensors hold {len(blocks)} blocks; the missing ones would be random. "
                                  f"Re-download or re-convert it"))
    if field("tokenizer.ggml.tokens") is None:
        problems.append(DataError(f"GGUF file {path} has no tokenizer (no tokenizer.ggml.tokens in its metadata); "
                                  f"use a GGUF converted with its tokenizer, or a model folder"))
    return problems


def _check_hub(source: str, revision: str | None) -> list[WandaPipelineError]:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
        return []  # online: the load itself will tell
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str):
        return [DataError(f"model {source!r} is a hub id, but HF_HUB_OFFLINE=1 and it is not in the local cache; "
                          f"download it first (`hf download {source}`), unset HF_HUB_OFFLINE, "
                          f"or point `model` at a local folder")]
    return []


def check_model(spec: ModelSpec) -> tuple[SourceFacts, list[WandaPipelineError]]:
    facts = SourceFacts()
    source = spec.source
    if source in DEMO_MODELS:
        from wanda_pipeline.models import demo_gguf_path
        from wanda_pipeline.settings import cache_dir

        folder = cache_dir() / "models" / source
        if (folder / ".complete").exists():
            facts.folder = folder
            return facts, _check_folder(folder, facts)
        try:
            return facts, _check_gguf(demo_gguf_path(source), facts)
        except DataError as exc:
            return facts, [exc]
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return facts, _check_gguf(path, facts)
    if path.exists():
        facts.folder = path
        return facts, _check_folder(path, facts)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        return facts, [DataError(f"model folder {source!r} does not exist; check the path")]
    import re

    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        return facts, [ConfigError(f"model {source!r} is neither a local path nor a hub id like 'org/name'")]
    return facts, _check_hub(source, spec.revision)


def can_write(folder: Path) -> bool:
    """Try it (permission bits say nothing for root or a read-only mount)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".wanda-write-probe-"):
            return True
    except OSError:
        return False


def can_write_file(path: Path) -> bool:
    try:
        with path.open("r+b"):
            return True
    except OSError:
        return False
