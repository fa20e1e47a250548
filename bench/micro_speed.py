"""Micro-benchmarks for bench_speed.py: mask selection and col_sq_norm accumulation.

The baselines are written out here: the reference code's per-column N:M loop, the
previous full-sort / grouped-topk mask code, and the statistics update as the engine
does it today (``WrappedGPT.add_batch``).
"""

from __future__ import annotations

import time

import torch

from wanda_pipeline.sparsity import nm_mask, per_layer_mask, per_row_mask

SHAPES = [(4096, 11008), (11008, 4096)]  # LLaMA-7B up/gate and down projections


def _best(fn, repeats: int, *args) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def column_loop(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = torch.zeros_like(metric, dtype=torch.bool)
    for ii in range(0, metric.shape[1], m):
        tmp = metric[:, ii : ii + m].float()
        mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    return mask


def grouped_topk(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = metric.shape
    groups = metric.float().reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False)[1]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)


def sorted_rows(metric: torch.Tensor, s: float) -> torch.Tensor:
    order = torch.sort(metric, dim=-1, stable=True)[1]
    return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, order[:, : int(metric.shape[1] * s)], True)


def sorted_layer(metric: torch.Tensor, s: float) -> torch.Tensor:
    flat = torch.zeros(metric.numel(), dtype=torch.bool)
    flat[torch.sort(metric.flatten(), stable=True)[1][: int(metric.numel() * s)]] = True
    return flat.view_as(metric)


def mask_timing(repeats: int = 3) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        metric = torch.rand(*shape, generator=g)
        cases = [("unstructured 50% per row", None, lambda x: sorted_rows(x, 0.5), lambda x: per_row_mask(x, 0.5)),
                 ("2:4", lambda x: column_loop(x, 2, 4), lambda x: grouped_topk(x, 2, 4), lambda x: nm_mask(x, 2, 4)),
                 ("4:8", lambda x: column_loop(x, 4, 8), lambda x: grouped_topk(x, 4, 8), lambda x: nm_mask(x, 4, 8))]
        if shape == SHAPES[0]:
            cases.append(("unstructured 50% per layer", None, lambda x: sorted_layer(x, 0.5),
                          lambda x: per_layer_mask(x, 0.5)))
        for pattern, loop, old, new in cases:
            new_s, new_mask = _best(new, repeats, metric)
            old_s, old_mask = _best(old, 1 if "layer" in pattern else repeats, metric)
            row = {"shape": f"{shape[0]}x{shape[1]}", "pattern": pattern, "new_s": new_s, "old_s": old_s,
                   "equal": bool(torch.equal(new_mask, old_mask))}
            if loop is not None:
                row["loop_s"], loop_mask = _best(loop, 1, metric)
                row["equal"] = row["equal"] and bool(torch.equal(new_mask, loop_mask))
            if not row["equal"]:
                raise SystemExit(f"mask mismatch: {row}")
            out.append(row)
            print(row, flush=True)
            del new_mask, old_mask
    return out


def _current(v: torch.Tensor, n: int, x: torch.Tensor) -> int:
    """The engine's update today (the reference's WrappedGPT.add_batch)."""
    b = x.shape[0]
    x = x.reshape(-1, x.shape[-1]).t().float()
    v *= n / (n + b)
    n += b
    v += torch.norm(x, p=2, dim=1) ** 2 / n
    return n


def _inplace(v: torch.Tensor, n: int, x: torch.Tensor) -> int:
    """Same formula, no transpose, no upcast copy (the reduction upcasts), in place."""
    b = x.shape[0]
    sq = torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), dim=0, dtype=torch.float32).square_()
    v.mul_(n / (n + b))
    n += b
    v.add_(sq.div_(n))
    return n


def _sum_then_divide(v: torch.Tensor, n: int, x: torch.Tensor) -> int:
    """Accumulate the plain sum of squares; divide once at the end (not done here)."""
    x = x.reshape(-1, x.shape[-1])
    v.add_(torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square_())
    return n + x.shape[0]


def _accumulate(fn, xs: list[torch.Tensor]) -> torch.Tensor:
    v, n = torch.zeros(xs[0].shape[-1]), 0
    for x in xs:
        n = fn(v, n, x)
    return v


def stats_timing(updates: int = 8, repeats: int = 5) -> list[dict]:
    inputs = [("1x512x576 fp32", (1, 512, 576), torch.float32), ("8x512x576 fp32", (8, 512, 576), torch.float32),
              ("1x512x1536 fp32", (1, 512, 1536), torch.float32), ("1x2048x4096 bf16", (1, 2048, 4096), torch.bfloat16)]
    out = []
    g = torch.Generator().manual_seed(1)
    for label, shape, dtype in inputs:
        xs = [torch.randn(*shape, generator=g).to(dtype) for _ in range(updates)]
        results = {}
        for name, fn in [("current", _current), ("in place, no transpose/cast", _inplace),
                         ("sum of squares, divide at end", _sum_then_divide)]:
            s, v = _best(_accumulate, repeats, fn, xs)
            results[name] = (s / updates, v)
        base_s, base_v = results["current"]
        for name, (s, v) in results.items():
            out.append({"input": label, "variant": name, "s": s, "speedup": base_s / s,
                        "bit_equal": bool(torch.equal(v, base_v))})
    return out
