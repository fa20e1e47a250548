"""Where finished blocks go: back into the in-memory model, or out to safetensors shards
(one file per block, written as soon as the block is done)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file
from torch import nn

OUTER_FILE = "model-outer.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class BlockSink(Protocol):
    def put(self, index: int, block: nn.Module) -> None: ...


class ModelSink:
    """Keep the block in the model, back on the CPU."""

    def put(self, index: int, block: nn.Module) -> None:
        block.to("cpu")


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that a kill mid-write leaves no partial file under ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
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

    def finish(self, model: nn.Module, source_weight_map: dict[str, str]) -> None:
        """Write everything outside the blocks (stored once when tied) and the shard index."""
        seen: set[int] = set()
        outer = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name.startswith(self.blocks_path + ".") or id(p) in seen:
                continue
            if name not in source_weight_map:  # a tied alias the source did not store either
                continue
            seen.add(id(p))
            outer[name] = p
        for name, b in model.named_buffers():
            if name in source_weight_map and not name.startswith(self.blocks_path + "."):
                outer[name] = b
        atomic_save(outer, self.folder / OUTER_FILE, {"format": "pt"})
        self.weight_map.update(dict.fromkeys(outer, OUTER_FILE))
        size = sum(os.path.getsize(self.folder / f) for f in set(self.weight_map.values()))
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(self.weight_map.items()))}
        tmp = self.folder / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.folder / INDEX_FILE)
        model.config.save_pretrained(self.folder)
