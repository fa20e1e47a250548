"""What a long stage will cost on a CPU, said before it starts (tokens x blocks x FLOPs per token).

A forward costs about 2 FLOPs per weight per token in the linears, plus the attention scores
(QK^T and AV: 4 x seqlen x hidden per token per block). The rate is this machine's, measured
with a short float32 matmul; a whole-model forward on 2 CPU cores ran at about that rate
(SmolLM2-135M, WikiText-2 at 2048: 1.25e14 FLOPs in about 14 minutes, ~1.5e11 FLOP/s, with
matmuls measuring 1.2-1.6e11). It is an estimate: other processes on the same cores slow it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# WikiText-2 test is about 300k tokens for LLaMA-style tokenizers (SmolLM2: 148 windows of 2048).
WIKITEXT2_TEST_TOKENS = 300_000
MIN_SECONDS = 30.0  # shorter stages are not worth a line
# A model forward reaches about 0.7x the 512^3 matmul rate: SmolLM2, 4 x 512 tokens, 1 thread on a
# shared core took 30 s where the matmul rate alone predicted 20 s.
EFFICIENCY = 0.7
_rate: float | None = None


@dataclass
class Estimate:
    stage: str
    tokens: int
    blocks: int
    forwards: int  # per block per token
    flops: float
    seconds: float
    what: str

    def line(self) -> str:
        return (f"[estimate] {self.stage}: {self.what} -> {self.tokens:,} tokens x {self.blocks} blocks x "
                f"{self.forwards} forward(s), {self.flops:.2g} FLOPs, about {_human(self.seconds)} on this CPU")


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def matmul_rate() -> float:
    """FLOP/s of a float32 matmul on this CPU with torch's threads (measured once per process)."""
    global _rate
    if _rate is None:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        a @ b  # warm up
        n, t0 = 0, time.perf_counter()
        while n < 4 or time.perf_counter() - t0 < 0.05:
            a @ b
            n += 1
        _rate = 2 * 512**3 * n / (time.perf_counter() - t0)
    return _rate


def flops_per_token(block_params: int, head_params: int, blocks: int, hidden: int, seqlen: int) -> float:
    """One forward of one token through ``blocks`` blocks (and the head, if ``head_params``)."""
    return 2.0 * (block_params * blocks + head_params) + 4.0 * seqlen * hidden * blocks


def _shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(weights per block, head weights, blocks, hidden size)."""
    from wanda_pipeline.models import find_blocks

    _, blocks = find_blocks(model)
    per_block = sum(p.numel() for p in blocks[0].parameters()) if len(blocks) else 0
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    return per_block, head_params, len(blocks), int(hidden)


def _on_cpu(model: nn.Module, device: str = "cpu") -> bool:
    if str(device) != "cpu":
        return False
    p = next(model.parameters(), None)
    return p is None or p.device.type in ("cpu", "meta")


def prune_cost(model: nn.Module, nsamples: int, seqlen: int, passes: int, device: str = "cpu") -> Estimate | None:
    if not _on_cpu(model, device):
        return None
    per_block, _, blocks, hidden = _shape(model)
    tokens = nsamples * seqlen
    flops = passes * tokens * flops_per_token(per_block, 0, blocks, hidden, seqlen)
    return Estimate("prune", tokens, blocks, passes, flops, flops / (matmul_rate() * EFFICIENCY),
                    f"calibration {nsamples} x {seqlen}")


def perplexity_cost(model: nn.Module, seqlen: int, windows: int | None, device: str = "cpu",
                    stage: str = "evaluate") -> Estimate | None:
    if not _on_cpu(model, device):
        return None
    per_block, head, blocks, hidden = _shape(model)
    tokens = windows * seqlen if windows else WIKITEXT2_TEST_TOKENS
    flops = tokens * flops_per_token(per_block, head, blocks, hidden, seqlen)
    what = f"perplexity {windows} x {seqlen}" if windows else f"perplexity, all windows of {seqlen} (~300k tokens)"
    return Estimate(stage, tokens, blocks, 1, flops, flops / (matmul_rate() * EFFICIENCY), what)


def stage_costs(name: str, args: tuple) -> list[Estimate]:
    """The estimates for a stage of :mod:`wanda_pipeline.run`, found from its arguments by type."""
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.data import Windows, default_seqlen
    from wanda_pipeline.models import max_positions
    from wanda_pipeline.stages import Loaded

    loaded = next((a for a in args if isinstance(a, Loaded)), None)
    if name == "prune" and loaded is not None:
        windows = next((a for a in args if isinstance(a, Windows)), None)
        spec = next((a for a in args if isinstance(a, PipelineSpec)), None)
        if windows is None or spec is None or spec.engine.stream:
            return []
        est = prune_cost(loaded.model, windows.tokens.shape[0], windows.tokens.shape[1], spec.engine.passes,
                         spec.engine.device)
        return [est] if est else []
    if name.startswith("evaluate") and args and isinstance(args[0], nn.Module):
        model, evaluators = args[0], next((a for a in args if isinstance(a, dict)), {})
        out = []
        for ev in evaluators.values():
            c = getattr(ev, "config", None)
            if type(ev).__name__ == "PerplexityEvaluator" and c is not None:
                seqlen = default_seqlen(max_positions(model), c.seqlen)
                est = perplexity_cost(model, seqlen, c.windows, c.device, name)
                out += [est] if est else []
        return out
    return []


def before_stage(name: str, args: tuple[Any, ...], min_seconds: float | None = None) -> None:
    """Print each estimate of at least ``min_seconds`` (default :data:`MIN_SECONDS`) to stderr."""
    for est in stage_costs(name, args):
        if est.seconds >= (MIN_SECONDS if min_seconds is None else min_seconds):
            print(est.line(), file=sys.stderr, flush=True)
