"""Write a pruned model as safetensors with its tokenizer and a provenance file, and
optionally in a compact sparse form (non-zero values plus a bitmask).

Every folder is written next to its destination under a hidden ``.NAME.partial-HOST-PID``
name and renamed into place only when complete, so a crash or kill never leaves a folder
that looks finished but does not load. What a ``kill -9`` leaves behind is removed by the
next save to the same destination."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PROVENANCE_FILE = "wanda_provenance.json"
SPARSE_FILE = "sparse_weights.safetensors"
SPARSE_FORMAT = "wanda-pipeline/bitmask-v1"
PARTIAL = ".partial-"
OLD = ".old-"


def _owner(pid: int | None = None) -> str:
    # the host too: on a shared filesystem a PID alone does not say whose folder it is
    return f"{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by a killed save (``kill -9``, power loss):
    only those written on this host by a process that no longer runs. Returns what was removed."""
    out = Path(out).expanduser()
    removed = []
    if not out.parent.is_dir():
        return removed
    host = socket.gethostname()
    for marker in (PARTIAL, OLD):
        for path in out.parent.glob(f".{glob.escape(out.name)}{marker}*"):
            owner_host, _, pid = path.name[len(out.name) + 1 + len(marker):].rpartition("-")
            if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)):
                if marker == OLD and not out.exists():
                    # killed between moving the old folder aside and the new one in: put it back
                    path.rename(out)
                    continue
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on any failure
    (signals included) it is removed. An existing non-empty ``out_dir`` needs ``overwrite``."""
    out = Path(out_dir).expanduser()
    remove_stale_partials(out)  # first: it may put back the folder a killed save had moved aside
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{PARTIAL}{_owner()}"
    old = out.parent / f".{out.name}{OLD}{_owner()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)  # the new folder did not go in: the old one comes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_pretrained(model: nn.Module, tokenizer: Any, out: Path, provenance: dict[str, Any]) -> None:
    # A streamed model's shards are already on disk: move them in instead of materialising it.
    streamed = getattr(model, "wanda_stream_folder", None)
    if streamed:  # hard links where possible: the staging folder may be saved again (registry)
        for f in Path(streamed).iterdir():
            try:
                os.link(f, out / f.name)
            except OSError:
                shutil.copy2(f, out / f.name)
    else:
        model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str))


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, provenance: dict[str, Any],
               overwrite: bool = False) -> Path:
    """``save_pretrained`` in safetensors, plus ``wanda_provenance.json``; atomic (see module doc)."""
    with atomic_folder(out_dir, overwrite) as tmp:
        _write_pretrained(model, tokenizer, tmp, provenance)
    return Path(out_dir).expanduser()


def read_provenance(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def pack_sparse(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight as its non-zero values (row-major order) and a packed bitmask of where they go."""
    flat = weight.detach().reshape(-1)
    keep = flat != 0
    pad = (-keep.numel()) % 8
    bits = torch.cat([keep, keep.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
    packed = (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)
    return {"values": flat[keep].contiguous(), "bitmask": packed}


def unpack_sparse(values: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    bits = (bitmask.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    keep = bits.reshape(-1)[:numel].bool()
    out = torch.zeros(numel, dtype=values.dtype)
    out[keep] = values
    return out.reshape(shape)


def save_sparse(model: nn.Module, tokenizer: Any, out_dir: str | Path, provenance: dict[str, Any],
                min_sparsity: float = 0.25) -> Path:
    """Like :func:`save_model`, but 2-D weights that are at least ``min_sparsity`` zero are
    stored as values + bitmask in ``sparse_weights.safetensors``; the rest stay dense.
    Load it back with :func:`load_sparse`."""
    with atomic_folder(out_dir, overwrite=True) as tmp:
        write_sparse(model, tokenizer, tmp, provenance, min_sparsity)
    return Path(out_dir)


def write_sparse(model: nn.Module, tokenizer: Any, out: Path, provenance: dict[str, Any],
                 min_sparsity: float = 0.25) -> None:
    """The files of :func:`save_sparse`, into an existing (temporary) folder ``out``."""
    state = model.state_dict()
    seen: dict[int, str] = {}
    dense, sparse, shapes = {}, {}, {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr in seen:  # tied weights (embeddings / lm_head) are stored once
            continue
        seen[ptr] = name
        if tensor.ndim == 2 and float((tensor == 0).float().mean()) >= min_sparsity:
            packed = pack_sparse(tensor)
            sparse[f"{name}.values"] = packed["values"]
            sparse[f"{name}.bitmask"] = packed["bitmask"]
            shapes[name] = list(tensor.shape)
        else:
            dense[name] = tensor.contiguous()
    save_file(dense, str(out / "dense_weights.safetensors"))
    save_file(sparse, str(out / SPARSE_FILE), metadata={"format": SPARSE_FORMAT, "shapes": json.dumps(shapes)})
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str))


def load_sparse(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save_sparse` (config + dense part + unpacked sparse part)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_file(str(path / "dense_weights.safetensors"))
    with safe_open(str(path / SPARSE_FILE), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != SPARSE_FORMAT:
            raise ValueError(f"{path / SPARSE_FILE} is not a {SPARSE_FORMAT} file")
        for name, shape in json.loads(meta["shapes"]).items():
            state[name] = unpack_sparse(f.get_tensor(f"{name}.values"), f.get_tensor(f"{name}.bitmask"), tuple(shape))
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[n]) for n in state if n in params}
    missing = [n for n in result.missing_keys if n not in params or id(params[n]) not in loaded]  # tied are fine
    if missing or result.unexpected_keys:
        raise ValueError(f"sparse checkpoint does not match the config: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def folder_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
