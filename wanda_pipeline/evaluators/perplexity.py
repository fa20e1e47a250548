"""Perplexity with the reference protocol (Wanda's ``lib/eval.py``)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from wanda_pipeline.data import default_seqlen, load_documents, read_local_documents, wikitext2_test_tokens
from wanda_pipeline.errors import DataError
from wanda_pipeline.intervals import BOOTSTRAP_ITERS, BOOTSTRAP_SEED, perplexity_interval
from wanda_pipeline.models import max_positions
from wanda_pipeline.per_example import digest
from wanda_pipeline.plugins import EvalResult, PluginConfig

CONFIDENCE = 0.95  # of the interval the evaluator reports; gates compute their own at their confidence


class PerplexityConfig(PluginConfig):
    dataset: Literal["wikitext2", "c4"] = "wikitext2"
    path: str | None = Field(None, description="a local file instead of the named dataset")
    seqlen: int | None = Field(None, gt=0)
    windows: int | None = Field(None, gt=0, description="evaluate only the first K windows")
    batch_size: int = Field(1, gt=0)
    device: str = "cpu"
    stream_activation_bytes: int = Field(1 << 30, gt=0, description="streamed models: activations held per pass "
                                         "over the blocks (more windows per pass = fewer reads of the weights)")


def eval_tokens(dataset: str, tokenizer: Any, seqlen: int, path: str | None = None) -> torch.Tensor:
    if dataset == "wikitext2":
        return wikitext2_test_tokens(tokenizer, path)
    # Reference C4: the first 1100 validation documents joined by spaces, at most 256 windows.
    docs = read_local_documents(Path(path)) if path else load_documents("c4", "validation")
    return tokenizer(" ".join(docs[:1100]), return_tensors="pt").input_ids[:, : 256 * seqlen]


def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, windows: int | None = None,
               batch_size: int = 1, device: str = "cpu", progress: bool = True) -> tuple[float, int]:
    """Non-overlapping ``seqlen`` windows; the mean of each window's mean NLL; exp.

    Returns (perplexity, windows used)."""
    ppl, n, _ = window_perplexity(model, tokens, seqlen, windows, batch_size, device, progress)
    return ppl, n


def _batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The batch's mean next-token NLL (the reference's number) and each window's own mean NLL."""
    flat_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    loss = nn.functional.cross_entropy(flat_logits, batch[:, 1:].reshape(-1))
    if batch.shape[0] == 1:
        return loss, [float(loss)]
    per_token = nn.functional.cross_entropy(flat_logits, batch[:, 1:].reshape(-1), reduction="none")
    return loss, per_token.view(batch.shape[0], -1).double().mean(dim=1).tolist()


def window_perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, windows: int | None = None,
                      batch_size: int = 1, device: str = "cpu", progress: bool = True
                      ) -> tuple[float, int, list[float]]:
    """:func:`perplexity` plus each window's mean NLL (for intervals and paired comparisons)."""
    tokens = _windows(tokens, seqlen, windows)
    n = tokens.shape[0]
    nll = torch.zeros((), dtype=torch.float64)
    per_window: list[float] = []
    model_device = next(model.parameters()).device
    if str(model_device) != device:
        model.to(device)
    with torch.no_grad():
        for i in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = tokens[i : i + batch_size].to(device)
            loss, rows = _batch_nll(model(input_ids=batch, use_cache=False).logits, batch)
            nll += loss.double().cpu() * seqlen * batch.shape[0]
            per_window += rows
    if str(model_device) != device:
        model.to(model_device)
    return math.exp(float(nll / (n * seqlen))), n, per_window


def _windows(tokens: torch.Tensor, seqlen: int, windows: int | None) -> torch.Tensor:
    total = tokens.numel() // seqlen
    n = min(total, windows) if windows else total
    if n == 0:
        raise DataError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens.reshape(-1)[: n * seqlen].reshape(n, seqlen)


def streamed_perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, windows: int | None = None,
                        batch_size: int = 1, device: str = "cpu", activation_bytes: int = 1 << 30,
                        progress: bool = True) -> tuple[float, int]:
    """The same protocol for a streamed model: windows go through the blocks one block at a
    time (each block read from its shard once per pass), then through the model's tail."""
    ppl, n, _ = streamed_window_perplexity(model, tokens, seqlen, windows, batch_size, device, activation_bytes,
                                           progress)
    return ppl, n


def streamed_window_perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, windows: int | None = None,
                               batch_size: int = 1, device: str = "cpu", activation_bytes: int = 1 << 30,
                               progress: bool = True) -> tuple[float, int, list[float]]:
    """:func:`streamed_perplexity` plus each window's mean NLL."""
    from wanda_pipeline.engine import LayerEngine, ShardSource
    from wanda_pipeline.engine.capture import run_tail
    from wanda_pipeline.engine.source import STREAM_ATTR

    tokens = _windows(tokens, seqlen, windows)
    n = tokens.shape[0]
    source = ShardSource(model, getattr(model, STREAM_ATTR))
    engine = LayerEngine(device=device, batch_size=batch_size, progress=False)
    hidden_size = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    per_window = 2 * seqlen * hidden_size * 4  # inputs and outputs of a block, float32
    per_pass = max(batch_size, (activation_bytes // per_window) // batch_size * batch_size)
    nll = torch.zeros((), dtype=torch.float64)
    per_window: list[float] = []
    for start in tqdm(range(0, n, per_pass), desc="perplexity passes", disable=not progress, leave=False):
        chunk = tokens[start : start + per_pass]
        captured = engine.capture(model, chunk, source)
        hidden = captured.inputs
        for index in range(len(source.blocks)):
            hidden = engine.forward(source.load(index, engine.device), hidden, captured.block_calls(index))
            source.release(index)
        with torch.no_grad():
            for b, final in enumerate(hidden):
                batch = chunk[b * batch_size : (b + 1) * batch_size]
                logits = run_tail(model, source.blocks, batch, final, captured.output_mode).logits
                loss, rows = _batch_nll(logits, batch)
                nll += loss.double().cpu() * seqlen * batch.shape[0]
                per_window += rows
    return math.exp(float(nll / (n * seqlen))), n, per_window


class PerplexityEvaluator:
    Config: ClassVar[type[PerplexityConfig]] = PerplexityConfig

    def __init__(self, config: PerplexityConfig | None = None):
        self.config = config or PerplexityConfig()

    def evaluate(self, model: nn.Module, tokenizer: Any) -> EvalResult:
        c = self.config
        seqlen = default_seqlen(max_positions(model), c.seqlen)
        tokens = eval_tokens(c.dataset, tokenizer, seqlen, c.path)
        if getattr(model, "wanda_stream_folder", None):
            ppl, used, nll = streamed_window_perplexity(model, tokens, seqlen, c.windows, c.batch_size, c.device,
                                                        c.stream_activation_bytes)
        else:
            ppl, used, nll = window_perplexity(model, tokens, seqlen, c.windows, c.batch_size, c.device)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        ci = perplexity_interval(nll, CONFIDENCE)
        protocol = {
            "dataset": c.path or c.dataset,
            "split": "test" if c.dataset == "wikitext2" else "validation",
            "seqlen": seqlen,
            "windows": used,
            "windows_available": tokens.numel() // seqlen,
            "tokens": used * seqlen,
            "dtype": dtype,
            "join": "\\n\\n" if c.dataset == "wikitext2" else " ",
            "interval": f"{CONFIDENCE:.0%} bootstrap over windows, {BOOTSTRAP_ITERS} resamples, seed {BOOTSTRAP_SEED}",
        }
        key = f"ppl_{c.dataset}"
        metrics = {key: ppl, f"{key}_stderr": ci.stderr, f"{key}_ci_low": ci.low, f"{key}_ci_high": ci.high,
                   f"{key}_n": float(used), f"{key}_tokens": float(used * seqlen)}
        scored = _windows(tokens, seqlen, c.windows).to(torch.int64).numpy().tobytes()
        examples = {key: {"kind": "nll", "ids": list(range(used)), "values": nll,
                          "digest": digest([seqlen, hashlib.sha256(scored).hexdigest()])}}
        return EvalResult(metrics=metrics, protocol=protocol, examples=examples)

    def per_example_metrics(self) -> dict[str, bool]:
        """The metrics this evaluator keeps per-example results for, and whether higher is better."""
        return {f"ppl_{self.config.dataset}": False}

    def examples_per_group(self) -> int | None:
        """How many paired examples each group of those metrics has at most (None: unknown here)."""
        return self.config.windows
