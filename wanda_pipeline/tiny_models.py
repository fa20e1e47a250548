"""Tiny random models built from configs, for tests, the conformance kit and demos."""

from __future__ import annotations

import torch
from torch import nn

from wanda_pipeline.errors import ConfigError


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2, vocab_size: int = 128) -> nn.Module:
    """A tiny random model for tests and demos, built from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size)
    if family == "llama":
        cfg = AutoConfig.for_model(
            "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common,
        )
    elif family == "opt":
        cfg = AutoConfig.for_model(
            "opt", hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=32, **common,
        )
    elif family == "gpt2":
        cfg = AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=layers, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0, **common
        )
    elif family == "qwen2":
        cfg = AutoConfig.for_model(
            "qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common,
        )
    else:
        raise ConfigError(f"no tiny model for family {family!r}")
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    model.config.use_cache = False
    return model
