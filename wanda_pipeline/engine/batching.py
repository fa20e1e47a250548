"""``batch_size: auto``: calibration sequences per forward, chosen from free memory."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Share of free memory one block forward may take: the stored activations, the pruner's
# statistics and other processes need the rest.
MEMORY_SHARE = 0.25
MAX_BATCH = {"cuda": 64, "cpu": 16}


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def per_sample_bytes(model: nn.Module, seqlen: int) -> int:
    """Peak activation bytes of one sequence through one block: hidden-sized and MLP-sized
    temporaries (a few of each, upcasts included) and the attention scores of one layer."""
    cfg = getattr(model, "config", None)
    get = lambda *names, default: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model", default=4096)
    inter = get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    heads = get("num_attention_heads", "n_head", default=32)
    elem = 4  # statistics and softmax run in float32
    return elem * seqlen * (8 * hidden + 3 * inter + 2 * heads * seqlen)


def auto_batch_size(model: nn.Module, tokens: torch.Tensor | None, device: torch.device) -> int:
    """The largest batch whose block forward fits in ``MEMORY_SHARE`` of free memory, capped.
    With passes=1 the block forward takes all sequences anyway, so batches only shape the
    capture; the same rule applies."""
    if tokens is None:
        return 1
    n, seqlen = tokens.shape[0], tokens.shape[1]
    fit = int(free_bytes(device) * MEMORY_SHARE // max(1, per_sample_bytes(model, seqlen)))
    batch = max(1, min(n, fit, MAX_BATCH.get(device.type, 16)))
    log.info("batch_size auto: %d (of %d sequences; about %d fit in free memory)", batch, n, fit)
    return batch
