"""Where finished blocks go: back into the in-memory model, or out to safetensors shards
(one file per block, written as soon as the block is done)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

OUTER_FILE = "model-outer.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class BlockSink(Protocol):
    def put(self, index: int, block: nn.Module) -> None: ...


class ModelSink:
    """Keep the block in the model, back on the CPU."""

    def put(self, index: int, block: nn.Module) -> None:
        block.to("cpu")


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def write_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written straight from the tensors' memory (no serialised copy)."""
    entries: dict[str, dict] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for t in tensors.values():
            out.write(_raw(t).numpy().data)


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that a kill mid-write leaves no partial file under ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    write_tensors(tensors, tmp, metadata)
    os.replace(tmp, path)


def block_file(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


class ShardSink:
    """Write each finished block to its own shard in ``folder``, then free it (back to meta)."""

    def __init__(self, folder: str | Path, blocks_path: str, release=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.blocks_path = blocks_path
        self.release = release
        self.weight_map: dict[str, str] = {}

    def put(self, index: int, block: nn.Module) -> None:
        state = {f"{self.blocks_path}.{index}.{k}": v for k, v in block.state_dict().items()}
        atomic_save(state, self.folder / block_file(index), {"format": "pt"})
        self.weight_map.update(dict.fromkeys(state, block_file(index)))
        if self.release is not None:
            self.release(index)
        else:
            block.to("meta")

    def finish(self, model: nn.Module, source_folder: Path, source_weight_map: dict[str, str],
               keys: dict[str, str] | None = None) -> None:
        """Copy everything outside the blocks byte for byte from the source shards (in chunks,
        so embeddings and head never need a second copy in memory), then write the index.
        ``keys`` maps model names to the source's checkpoint keys where they differ."""
        outer = [n for n in source_weight_map if not n.startswith(self.blocks_path + ".")]
        copy_raw(source_folder, source_weight_map, outer, self.folder / OUTER_FILE, keys)
        self.weight_map.update(dict.fromkeys(outer, OUTER_FILE))
        size = sum(os.path.getsize(self.folder / f) for f in set(self.weight_map.values()))
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(self.weight_map.items()))}
        tmp = self.folder / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.folder / INDEX_FILE)
        model.config.save_pretrained(self.folder)


def _header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def copy_raw(folder: Path, weight_map: dict[str, str], names: list[str], dest: Path,
             keys: dict[str, str] | None = None, chunk: int = 64 << 20) -> None:
    """Write the named tensors of safetensors shards into one new file without deserialising them."""
    keys = keys or {}
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    plan, offset, headers = [], 0, {}
    for name in names:
        src = folder / weight_map[name]
        if src not in headers:
            headers[src] = _header(src)
        n, hdr = headers[src]
        info = hdr[keys.get(name, name)]
        begin, end = info["data_offsets"]
        entries[name] = {"dtype": info["dtype"], "shape": info["shape"],
                         "data_offsets": [offset, offset + end - begin]}
        plan.append((src, 8 + n + begin, end - begin))
        offset += end - begin
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for src, start, length in plan:
            with src.open("rb") as f:
                f.seek(start)
                while length:
                    data = f.read(min(chunk, length))
                    out.write(data)
                    length -= len(data)
    os.replace(tmp, dest)
