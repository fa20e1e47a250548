"""SparseGPT (Frantar & Alistarh 2023): prune column block by column block and update the
remaining weights with the inverse Hessian of the layer inputs (``gram`` = 2/n X^T X)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import Field

from wanda_pipeline.plugins import PrunerConfig
from wanda_pipeline.sparsity import parse_pattern


class SparseGPTConfig(PrunerConfig):
    percdamp: float = Field(0.01, gt=0, description="dampening, as a fraction of the mean Hessian diagonal")
    blocksize: int = Field(128, gt=0, description="columns pruned together (lazy batch updates)")
    max_damp_retries: int = Field(4, ge=0, description="retries with 10x dampening if Cholesky fails")


def inverse_hessian_cholesky(h: torch.Tensor, percdamp: float, retries: int) -> tuple[torch.Tensor, int]:
    """Upper Cholesky factor of H^-1 after dampening; returns (factor, fallbacks used)."""
    damp = percdamp * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries + 1):
        try:
            lower = torch.linalg.cholesky(h + damp * (10**attempt) * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True), attempt
        except torch.linalg.LinAlgError:
            continue
    # Last resort: a diagonal Hessian, i.e. magnitude-like pruning with no weight update.
    diag = torch.diag(h).clamp_min(1e-8) + damp
    return torch.diag(1.0 / diag.sqrt()), retries + 1


def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                    percdamp: float = 0.01, blocksize: int = 128, retries: int = 4) -> tuple[torch.Tensor, int]:
    """Prune ``weight`` in place; returns (mask, Hessian fallbacks used)."""
    W = weight.detach().float().clone()
    H = gram.float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, fallbacks = inverse_hessian_cholesky(H, percdamp, retries)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            score = W1**2 / d.reshape(1, -1) ** 2
            # Spread int(numel * s) over the blocks so the layer total is exact.
            k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
            if k:
                order = torch.sort(score.flatten(), stable=True)[1]
                mask1.view(-1)[order[:k]] = True
        for i in range(count):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0 and i + nm[1] <= count:
                score = W1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, nm[0], dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[mask] = 0
    with torch.no_grad():
        weight.copy_(W.to(weight.dtype))
    return mask, fallbacks


class SparseGPTPruner:
    Config: ClassVar[type[SparseGPTConfig]] = SparseGPTConfig
    updates_weights: ClassVar[bool] = True

    def __init__(self, config: SparseGPTConfig | None = None):
        self.config = config or SparseGPTConfig()
        self.counters = {"hessian_fallbacks": 0, "linears": 0}

    def required_stats(self) -> set[str]:
        return {"gram"}

    def prune(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor], sparsity: float) -> torch.Tensor:
        c = self.config
        nm = parse_pattern(c.pattern)
        if c.blocksize % (nm[1] if nm else 1):
            raise ValueError(f"blocksize {c.blocksize} must be a multiple of M={nm[1]}")
        mask, fallbacks = sparsegpt_prune(weight, stats["gram"], sparsity, nm, c.percdamp, c.blocksize,
                                          c.max_damp_retries)
        self.counters["hessian_fallbacks"] += fallbacks
        self.counters["linears"] += 1
        return mask
