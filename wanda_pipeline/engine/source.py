"""Where block weights come from: a model already in memory, or safetensors shards
materialised one block at a time onto a meta-device skeleton."""

from __future__ import annotations

import ctypes
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from wanda_pipeline.errors import ConfigError, DataError
from wanda_pipeline.models import find_blocks, weights_fingerprint

STREAM_ATTR = "wanda_stream_folder"


class BlockSource(Protocol):
    model: nn.Module
    blocks_path: str
    blocks: nn.ModuleList

    def prepare_outer(self) -> torch.device:
        """Make everything outside the blocks usable; return the device to feed input ids on."""
        ...

    def load(self, index: int, device: torch.device) -> nn.Module: ...

    def fingerprint(self) -> str: ...


class ModelSource:
    """Blocks of an in-memory model, moved to the execution device one at a time."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks_path, self.blocks = find_blocks(model)

    def prepare_outer(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def load(self, index: int, device: torch.device) -> nn.Module:
        return self.blocks[index].to(device)

    def fingerprint(self) -> str:
        return weights_fingerprint(self.model)


def read_tensor(path: Path, key: str, headers: dict) -> torch.Tensor:
    """One tensor of a safetensors file by plain reads: no memory map, whose pages would count
    as resident memory of this process, and no second copy."""
    from wanda_pipeline.engine.sink import DTYPES

    if path not in headers:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            headers[path] = (n, json.loads(f.read(n)))
    n, header = headers[path]
    info = header[key]
    begin, end = info["data_offsets"]
    out = torch.empty(end - begin, dtype=torch.uint8)
    with path.open("rb") as f:
        f.seek(8 + n + begin)
        if f.readinto(out.numpy().data) != end - begin:
            raise DataError(f"{path} is truncated at tensor {key!r}")
    return out.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def _model_names(model: nn.Module, checkpoint_keys: list[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key, through the renamings transformers applies on
    load (e.g. GPT-NeoX ``embed_out`` -> ``lm_head``). Merges and splits cannot be streamed."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {k: k for k in checkpoint_keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)
    names = {}
    for key in checkpoint_keys:
        name, converted = rename_source_key(key, renamings, converters, prefix, meta)
        if converted is not None:
            raise ConfigError(f"{type(model).__name__}: checkpoint tensor {key!r} is merged or split on load "
                              f"({converted}); streaming cannot read it tensor by tensor: drop --stream")
        names[name] = key
    return names


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.exists():
        raise DataError(f"{folder} has no model.safetensors(.index.json); streaming needs safetensors weights")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single.name for k in f.keys()}


class ShardSource:
    """Blocks of a skeleton whose parameters live on the meta device, read per tensor from
    safetensors shards. Tied parameters (one object under several names) stay tied."""

    def __init__(self, model: nn.Module, folder: str | Path):
        self.model = model
        self.folder = Path(folder)
        files = _weight_map(self.folder)
        self.keys = _model_names(model, list(files))  # model name -> checkpoint key
        self.weight_map = {name: files[key] for name, key in self.keys.items()}
        self.blocks_path, self.blocks = find_blocks(model)
        self._headers: dict[Path, tuple[int, dict]] = {}
        setattr(model, STREAM_ATTR, str(self.folder))

    def _aliases(self) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        return groups

    def _read(self, names: list[str], device: torch.device) -> torch.Tensor:
        for name in names:
            if name in self.weight_map:
                return read_tensor(self.folder / self.weight_map[name], self.keys[name], self._headers).to(device)
        raise DataError(f"{self.folder}: no tensor for {names[0]!r} in the safetensors shards")

    def materialise(self, prefix: str, module: nn.Module, device: torch.device) -> None:
        groups = self._aliases()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for local, p in list(module.named_parameters(remove_duplicate=False)):
            if not p.is_meta:
                continue
            names = groups[id(p)]
            full = f"{prefix}{local}"
            tensor = self._read([full] + [n for n in names if n != full], device)
            new = nn.Parameter(tensor.to(p.dtype), requires_grad=False)
            for name in names:
                owner_name, _, leaf = name.rpartition(".")
                owner = self.model.get_submodule(owner_name) if owner_name else self.model
                if owner._parameters.get(leaf) is params[name]:
                    owner._parameters[leaf] = new
        for local, b in list(module.named_buffers()):
            full = f"{prefix}{local}"
            if b.is_meta and full in self.weight_map:
                owner_name, _, leaf = full.rpartition(".")
                owner = self.model.get_submodule(owner_name) if owner_name else self.model
                owner._buffers[leaf] = self._read([full], device)

    def prepare_outer(self) -> torch.device:
        """Materialise, on the CPU, every parameter outside the decoder blocks (embeddings,
        final norm, head): their size does not grow with depth."""
        block_ids = {id(p) for p in self.blocks.parameters()}
        for name, module in self.model.named_modules():
            if module is self.blocks or name.startswith(self.blocks_path + "."):
                continue
            own = [p for p in module.parameters(recurse=False) if p.is_meta and id(p) not in block_ids]
            if own:
                self.materialise(f"{name}." if name else "", _Own(module), torch.device("cpu"))
        return torch.device("cpu")

    def load(self, index: int, device: torch.device) -> nn.Module:
        block = self.blocks[index]
        self.materialise(f"{self.blocks_path}.{index}.", block, device)
        return block

    def release(self, index: int) -> None:
        self.blocks[index].to("meta")
        _return_freed_memory()

    def fingerprint(self) -> str:
        """Digest of the config and every shard's header and size (no weight bytes read)."""
        h = hashlib.sha256((self.folder / "config.json").read_bytes() if (self.folder / "config.json").exists()
                           else b"")
        for shard in sorted(set(self.weight_map.values())):
            path = self.folder / shard
            with path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(n))
            h.update(str(path.stat().st_size).encode())
        return h.hexdigest()[:16]


def _return_freed_memory() -> None:
    """glibc keeps freed block-sized chunks in its heap, so without a trim resident memory
    creeps up by about a block's worth of small tensors per block (measured: +64 MB per
    block of a hidden-2048 LLaMA)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Own(nn.Module):
    """A view of one module's own parameters only (not its children's)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        object.__setattr__(self, "_target", module)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self._target.named_parameters(recurse=False, remove_duplicate=remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self._target.named_buffers(recurse=False)


def iter_blocks(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """Each decoder block with real weights: as-is in memory, or streamed from its folder
    (materialised on the CPU, then released)."""
    folder = getattr(model, STREAM_ATTR, None)
    if folder is None:
        yield from enumerate(find_blocks(model)[1])
        return
    source = ShardSource(model, folder)
    for i in range(len(source.blocks)):
        yield i, source.load(i, torch.device("cpu"))
        source.release(i)
