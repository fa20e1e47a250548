"""Prefill and decode latency of the model it is given, and, on CUDA with 2:4 weights, of the
same model with its qualifying linears as semi-structured sparse tensors.

The dense reference: the run path evaluates the dense model with every evaluator before
pruning (``evaluate-dense``), so this evaluator times the dense model there and the pruned
one here, on the same device in the same run, and the run reports ``*_vs_dense`` ratios.
No copy of the model is kept. The 2:4 comparison (dense kernels vs sparse kernels on the
same pruned weights) swaps each qualifying weight for its compressed form (about 56% of
its size) and swaps it back afterwards.

Never fails the run over the sparse part: any reason it cannot apply is reported in the
protocol (``sparse_kernel_reason``) and the dense-path timings still come back.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from wanda_pipeline.plugins import EvalResult, PluginConfig

KERNELS = ("cuSPARSELt", "CUTLASS")


class LatencyConfig(PluginConfig):
    device: str = Field("cpu", description="cpu, cuda or cuda:N; the model is moved there and back")
    prompt_tokens: int = Field(128, gt=0, description="prefill length")
    decode_tokens: int = Field(32, gt=0, description="greedy tokens generated after the prompt")
    batch_size: int = Field(1, gt=0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, gt=0, description="timed runs; the median is reported")
    sparse_kernel: Literal["auto", "off"] = Field("auto", description="auto: try 2:4 kernels on CUDA")
    force_cutlass: bool = Field(False, description="use CUTLASS even where cuSPARSELt is available")
    seed: int = 0

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r}: use cpu, cuda or cuda:N")
        return v


@dataclass(frozen=True)
class LinearInfo:
    name: str
    out_features: int
    in_features: int
    dtype: torch.dtype
    is_2_4: bool


def is_2_4(weight: torch.Tensor) -> bool:
    """At least 2 zeros in every 4 consecutive input columns of every row."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight.reshape(rows, cols // 4, 4) == 0).sum(-1) >= 2).all())


def choose_kernel(cusparselt_available: bool, force_cutlass: bool = False) -> str:
    return "cuSPARSELt" if cusparselt_available and not force_cutlass else "CUTLASS"


def kernel_constraints(kernel: str) -> dict[torch.dtype, tuple[int, int]]:
    """dtype -> (min rows, min cols) a weight needs, both multiples, from torch's own tables."""
    cls = (torch.sparse.SparseSemiStructuredTensorCUSPARSELT if kernel == "cuSPARSELt"
           else torch.sparse.SparseSemiStructuredTensorCUTLASS)
    return {dt: (c.sparse_min_rows, c.sparse_min_cols) for dt, c in cls._DTYPE_SHAPE_CONSTRAINTS.items()}


def unavailable_reason(device: str, capability: tuple[int, int] | None, sparse_kernel: str) -> str | None:
    """Why no semi-structured kernel can run here, or None if one can."""
    if sparse_kernel == "off":
        return "sparse_kernel: off"
    if not device.startswith("cuda"):
        return f"device {device}: semi-structured sparse kernels are CUDA-only; dense-path timings only"
    if capability is None or capability < (8, 0):
        return f"GPU compute capability {capability} < (8, 0): 2:4 sparse tensor cores need Ampere or newer"
    return None


def plan_semi_structured(linears: list[LinearInfo], kernel: str) -> tuple[list[str], dict[str, str]]:
    """Which linears the kernel can take (2:4-valid, dtype supported, shape multiples of its
    minimum tile); the others with the reason."""
    constraints = kernel_constraints(kernel)
    ok, skipped = [], {}
    for lin in linears:
        if not lin.is_2_4:
            skipped[lin.name] = "weight does not follow 2:4"
        elif lin.dtype not in constraints:
            skipped[lin.name] = f"{kernel} does not take {str(lin.dtype).removeprefix('torch.')}"
        else:
            rows, cols = constraints[lin.dtype]
            if lin.out_features % rows or lin.in_features % cols:
                skipped[lin.name] = f"shape ({lin.out_features}, {lin.in_features}) not a multiple of ({rows}, {cols})"
            else:
                ok.append(lin.name)
    return ok, skipped


def linear_infos(model: nn.Module) -> list[LinearInfo]:
    return [LinearInfo(n, m.out_features, m.in_features, m.weight.dtype, is_2_4(m.weight.data))
            for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _median_ms(fn, args: tuple, device: str, warmup: int, repeats: int) -> float:
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def time_generation(model: nn.Module, ids: torch.Tensor, decode_tokens: int, warmup: int, repeats: int,
                    device: str) -> tuple[float, float]:
    """(prefill ms, decode ms per token), medians: one forward over the prompt with a KV cache,
    then ``decode_tokens`` greedy single-token forwards."""
    prefill, decode = [], []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            prefill.append(t1 - t0)
            decode.append((time.perf_counter() - t1) / decode_tokens)
    return statistics.median(prefill) * 1e3, statistics.median(decode) * 1e3


class LatencyEvaluator:
    Config: ClassVar[type[LatencyConfig]] = LatencyConfig

    def __init__(self, config: LatencyConfig | None = None):
        self.config = config or LatencyConfig()

    def evaluate(self, model: nn.Module, tokenizer: Any) -> EvalResult:
        c = self.config
        home = next(model.parameters()).device
        model.to(c.device)
        try:
            return self._evaluate(model)
        finally:
            model.to(home)

    def _evaluate(self, model: nn.Module) -> EvalResult:
        c = self.config
        vocab = model.get_input_embeddings().num_embeddings
        g = torch.Generator().manual_seed(c.seed)
        ids = torch.randint(0, vocab, (c.batch_size, c.prompt_tokens), generator=g).to(c.device)
        prefill, decode = time_generation(model, ids, c.decode_tokens, c.warmup, c.repeats, c.device)
        metrics = {"latency_prefill_ms": prefill, "latency_decode_ms_per_token": decode,
                   "latency_decode_tokens_per_s": c.batch_size * 1e3 / decode}
        protocol: dict[str, Any] = {
            "device": torch.cuda.get_device_name(c.device) if c.device.startswith("cuda") else "cpu",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "prompt_tokens": c.prompt_tokens,
            "decode_tokens": c.decode_tokens, "batch_size": c.batch_size, "repeats": c.repeats,
            "statistic": "median", "torch": torch.__version__}
        tables: dict[str, list[dict]] = {}
        capability = torch.cuda.get_device_capability(c.device) if c.device.startswith("cuda") else None
        reason = unavailable_reason(c.device, capability, c.sparse_kernel)
        kernel = choose_kernel(c.device.startswith("cuda") and torch.backends.cusparselt.is_available(),
                               c.force_cutlass)
        if reason is None:
            qualifying, skipped = plan_semi_structured(linear_infos(model), kernel)
            protocol["sparse_linears_skipped"] = len(skipped)
            if not qualifying:
                reason = f"no linear qualifies for {kernel}: " + (next(iter(skipped.values())) if skipped else "none")
            else:
                try:
                    sparse = self._sparse(model, ids, qualifying, kernel)
                    tables["latency_per_shape"] = sparse.pop("rows")
                    metrics.update(sparse)
                    metrics["latency_sparse_prefill_speedup"] = prefill / metrics["latency_sparse_prefill_ms"]
                    metrics["latency_sparse_decode_speedup"] = decode / metrics["latency_sparse_decode_ms_per_token"]
                except Exception as exc:  # the kernels are optional; never fail the run over them
                    reason = f"{kernel} failed: {type(exc).__name__}: {exc}"
        protocol["sparse_kernel"] = kernel if reason is None else "none"
        protocol["sparse_kernel_reason"] = reason or "applied"
        return EvalResult(metrics=metrics, protocol=protocol, tables=tables)

    def _sparse(self, model: nn.Module, ids: torch.Tensor, names: list[str], kernel: str) -> dict[str, Any]:
        """Per-shape matmul speedups, then end to end with the qualifying weights swapped in."""
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        c = self.config
        SparseSemiStructuredTensor._FORCE_CUTLASS = kernel == "CUTLASS"
        modules = dict(model.named_modules())
        rows, seen = [], set()
        tokens = c.batch_size * c.prompt_tokens
        for name in names:
            w = modules[name].weight.data
            key = (tuple(w.shape), w.dtype)
            if key in seen:
                continue
            seen.add(key)
            x = torch.randn(tokens, w.shape[1], dtype=w.dtype, device=w.device)
            ws = to_sparse_semi_structured(w.contiguous())
            dense_ms = _median_ms(nn.functional.linear, (x, w), c.device, c.warmup + 2, c.repeats * 3)
            sparse_ms = _median_ms(nn.functional.linear, (x, ws), c.device, c.warmup + 2, c.repeats * 3)
            rows.append({"shape": f"{w.shape[0]}x{w.shape[1]}", "dtype": str(w.dtype).removeprefix("torch."),
                         "tokens": tokens, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                         "speedup": dense_ms / sparse_ms, "kernel": kernel})
        originals = {n: modules[n].weight for n in names}
        try:
            for n in names:
                sparse_w = to_sparse_semi_structured(originals[n].data.contiguous())
                modules[n].weight = nn.Parameter(sparse_w, requires_grad=False)
            prefill, decode = time_generation(model, ids, c.decode_tokens, c.warmup, c.repeats, c.device)
        finally:
            for n, p in originals.items():
                modules[n].weight = p
        return {"latency_sparse_prefill_ms": prefill, "latency_sparse_decode_ms_per_token": decode,
                "latency_sparse_linears": float(len(names)), "rows": rows}
