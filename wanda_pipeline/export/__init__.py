"""Write a pruned (and maybe quantised) model in one of three formats.

- ``hf``: ``save_pretrained`` safetensors, dense, pruned zeros stored as zeros. Every loader.
- ``compressed-tensors``: what vLLM and transformers load as a quantised model
  (``pack-quantized`` int4/int8 when a quantizer ran, dense otherwise), with the sparsity
  metadata in ``config.json``. See :mod:`wanda_pipeline.export.compressed_tensors`.
- ``bitmask-v1``: this project's compact archive (non-zeros + bitmask); only
  :func:`wanda_pipeline.saving.load_sparse` reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from torch import nn

from wanda_pipeline.errors import ConfigError

Format = Literal["hf", "bitmask-v1", "compressed-tensors"]
FORMATS: tuple[str, ...] = get_args(Format)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown save format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def save(model: nn.Module, tokenizer: Any, out_dir: str | Path, fmt: Format, provenance: dict[str, Any],
         quantizer: Any | None = None, pattern: str = "unstructured", include: str | None = None,
         exclude: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` to ``out_dir`` in ``fmt``. ``quantizer`` (the instance that quantised the
    model in this process) and ``pattern``/``include``/``exclude`` (what was pruned) matter for
    ``compressed-tensors`` only."""
    from wanda_pipeline.saving import atomic_folder, save_model, write_sparse

    check_format(fmt)
    if fmt == "hf":
        return save_model(model, tokenizer, out_dir, provenance, overwrite=overwrite)
    out = Path(out_dir).expanduser()
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose a new folder or allow overwriting (--overwrite)")
    # One atomic folder, whole or nothing, and no second one nested in it: a kill inside a nested
    # one would leave a hidden folder that no later save to ``out`` recognises as its own.
    with atomic_folder(out, overwrite) as tmp:
        if fmt == "bitmask-v1":
            write_sparse(model, tokenizer, tmp, provenance)
        else:
            from wanda_pipeline.export.compressed_tensors import write_compressed
            from wanda_pipeline.export.metadata import sparsity_metadata

            meta = sparsity_metadata(model, pattern, include, exclude)
            write_compressed(model, tokenizer, tmp, quantizer, meta, provenance)
    return out
