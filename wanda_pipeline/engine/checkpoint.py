"""Resume a layer-by-layer run: after each finished block, its state (masks, or weights for
pruners that update them) and the activations at the block boundary go to safetensors, and
a JSON manifest with the run's fingerprint records how far the run got.

Layout of a checkpoint folder::

    manifest.json                 {"version", "fingerprint", "n_blocks", "finished": K}
    block-00000.safetensors       block 0's state (bool masks bit-packed)
    ...
    inputs-0000K.safetensors      the inputs of block K, one tensor per calibration batch

Every file is written to a temporary name and renamed; the manifest is written last, so it
is the commit point: a kill at any moment leaves the previous consistent state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from wanda_pipeline.engine.sink import atomic_save
from wanda_pipeline.errors import ConfigError, DataError

MANIFEST = "manifest.json"
VERSION = 1
# every name this module writes, temporaries included
_OURS = re.compile(r"(manifest\.json|(block|inputs)-\d{5}\.safetensors)(\.tmp)?")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    out = (bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return out.reshape(-1)[:numel].bool().reshape(shape)


def holds_checkpoint(folder: Path) -> bool:
    """A folder a checkpoint may start over in: it has a manifest, or only checkpoint files (what
    a half-finished removal leaves, manifest first)."""
    if (folder / MANIFEST).is_file():
        return True
    entries = list(folder.iterdir()) if folder.is_dir() else []
    return bool(entries) and all(_OURS.fullmatch(p.name) for p in entries)


def manifest_problem(folder: Path, files: bool = True) -> str | None:
    """What is wrong with the manifest in ``folder`` (and the block files it counts), or None."""
    from wanda_pipeline.sourcecheck import check_safetensors

    try:
        found = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"not readable JSON ({exc})"
    if not isinstance(found, dict) or not isinstance(found.get("fingerprint", {}), dict) \
            or not all(isinstance(found.get(k), int) for k in ("n_blocks", "finished")):
        return "not a checkpoint manifest (needs the integers n_blocks and finished, and a fingerprint)"
    for name in [Checkpoint._block_name(i) for i in range(found["finished"])] if files else []:  # inputs: start()
        path = folder / name
        bad = check_safetensors(path) if path.exists() else "it is missing"
        if bad:
            return f"{name}, which it counts as written, is unusable: {bad}"
    return None


class Checkpoint:
    def __init__(self, folder: str | Path, fingerprint: dict, resume: bool = True):
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.resume = resume
        self.n_blocks = 0

    def start(self, n_blocks: int) -> int:
        """The first unfinished block (0 for a fresh run); refuses another run's checkpoint."""
        self.n_blocks = n_blocks
        manifest = self.folder / MANIFEST
        if manifest.exists() and self.resume:
            self._refuse_corrupt(manifest_problem(self.folder, files=False))
            found = json.loads(manifest.read_text())
            if found.get("fingerprint") != self.fingerprint or found.get("n_blocks") != n_blocks:
                diff = sorted(k for k in set(self.fingerprint) | set(found.get("fingerprint", {}))
                              if self.fingerprint.get(k) != found.get("fingerprint", {}).get(k))
                raise ConfigError(
                    f"checkpoint {self.folder} belongs to another run (differs in: {', '.join(diff) or 'n_blocks'}); "
                    "pass --no_resume to start fresh there, or choose another --checkpoint_dir"
                )
            self._refuse_corrupt(manifest_problem(self.folder))
            finished = int(found["finished"])
            if finished and not (self.folder / self._inputs_name(finished)).exists() and finished < n_blocks:
                raise ConfigError(f"checkpoint {self.folder} is incomplete (no inputs of block {finished}); "
                                  "pass --no_resume to start fresh")
            self._drop_stale(finished)
            return finished
        if self.folder.exists() and any(self.folder.iterdir()) and not manifest.exists() and not self._only_ours():
            raise ConfigError(f"--checkpoint_dir {self.folder} is not empty and holds no checkpoint; "
                              "choose an empty or new folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        # Commit "nothing finished" before deleting the old files: a crash while they go leaves a
        # checkpoint that resumes at block 0, never a manifest pointing at deleted files.
        self._write_manifest(0)
        self._drop_stale(0)
        return 0

    def _refuse_corrupt(self, problem: str | None) -> None:
        if problem:
            raise DataError(f"checkpoint {self.folder / MANIFEST} is corrupt: {problem}; pass --no_resume "
                            f"(engine.resume: false) to start fresh there, or remove {self.folder}")

    def _only_ours(self) -> bool:
        """True if every entry has a checkpoint file's name (what a half-finished remove leaves)."""
        return holds_checkpoint(self.folder)

    def _drop_stale(self, finished: int) -> None:
        """Remove what the manifest does not use: later blocks, older inputs, temporaries."""
        keep = {MANIFEST, self._inputs_name(finished), *(self._block_name(i) for i in range(finished))}
        for path in self.folder.iterdir():
            if path.name not in keep and _OURS.fullmatch(path.name):
                path.unlink(missing_ok=True)

    @staticmethod
    def _inputs_name(index: int) -> str:
        return f"inputs-{index:05d}.safetensors"

    @staticmethod
    def _block_name(index: int) -> str:
        return f"block-{index:05d}.safetensors"

    def _write_manifest(self, finished: int) -> None:
        body = {"version": VERSION, "fingerprint": self.fingerprint, "n_blocks": self.n_blocks, "finished": finished}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
        os.replace(tmp, self.folder / MANIFEST)

    def save(self, index: int, state: dict[str, torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Block ``index`` is finished; ``outputs`` are the inputs of block ``index + 1``."""
        tensors, shapes = {}, {}
        for key, t in state.items():
            if t.dtype == torch.bool:
                tensors[key] = pack_bits(t)
                shapes[key] = list(t.shape)
            else:
                tensors[key] = t
        atomic_save(tensors, self.folder / self._block_name(index), {"bool_shapes": json.dumps(shapes)})
        if index + 1 < self.n_blocks:
            atomic_save({f"batch.{j}": o for j, o in enumerate(outputs)}, self.folder / self._inputs_name(index + 1))
        self._write_manifest(index + 1)
        (self.folder / self._inputs_name(index)).unlink(missing_ok=True)

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        path = self.folder / self._block_name(index)
        with safe_open(str(path), framework="pt") as f:
            shapes = json.loads((f.metadata() or {}).get("bool_shapes", "{}"))
        tensors = load_file(str(path))
        return {k: unpack_bits(v, tuple(shapes[k])) if k in shapes else v for k, v in tensors.items()}

    def inputs(self, index: int) -> list[torch.Tensor]:
        tensors = load_file(str(self.folder / self._inputs_name(index)))
        return [tensors[f"batch.{j}"] for j in range(len(tensors))]

    def remove(self) -> None:
        remove_checkpoint(self.folder)


def remove_checkpoint(folder: str | Path) -> None:
    """Delete a checkpoint folder, manifest first: if the deletion stops half way, what is left is
    never taken for a resumable checkpoint (the next start clears it)."""
    try:
        (Path(folder) / MANIFEST).unlink(missing_ok=True)
    except OSError:
        return  # still a whole, resumable checkpoint: better than half of one
    shutil.rmtree(folder, ignore_errors=True)
