"""A model skeleton for streaming: the architecture with every parameter on the meta device
(no host memory), buffers computed as usual, weights left in the safetensors shards."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wanda_pipeline.errors import ConfigError, DataError


def safetensors_folder(path: str, revision: str | None = None) -> Path:
    """A local folder with safetensors weights: the path itself, or a hub snapshot."""
    local = Path(path).expanduser()
    if not local.exists():
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(path, revision=revision,
                                           allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as exc:
            raise DataError(f"could not fetch a snapshot of {path!r} for streaming: {exc}") from exc
    if not (local / "model.safetensors").exists() and not (local / "model.safetensors.index.json").exists():
        raise ConfigError(f"{local} has no safetensors weights (model.safetensors or an index); streaming needs "
                          "them: drop --stream / engine.stream, or convert the model to safetensors first")
    return local


def build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    model.eval()
    model.config.use_cache = False
    return model
