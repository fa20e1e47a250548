"""Streaming per-linear input statistics a pruner can ask for by name.

Each accumulator sees a linear's inputs batch by batch, in float32, and never keeps
the raw activations.
"""

from __future__ import annotations

import math

import torch

from wanda_pipeline.errors import PluginError


class _RunningMean:
    """The reference's streaming update: with ``b`` new samples, rescale the running value by
    n / (n + b), then add the new samples' contribution divided by the new n."""

    value: torch.Tensor

    def __init__(self):
        self.nsamples = 0

    def update(self, x: torch.Tensor, samples: int | None = None) -> None:
        """``samples``: calibration sequences in ``x``. The engine passes it, because some blocks
        (OPT) flatten (batch, seq, hidden) to (batch * seq, hidden) before their MLP."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        batch = samples if samples is not None else x.shape[0]
        x = x.reshape(-1, x.shape[-1]).t().float()  # (in_features, tokens)
        self.value *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self._add(x)

    def _add(self, x: torch.Tensor) -> None:
        raise NotImplementedError


class ColumnSqNorm(_RunningMean):
    """``col_sq_norm``: squared L2 norm of each input column, as a running mean over
    samples, updated exactly like the reference ``WrappedGPT.add_batch``."""

    def __init__(self, in_features: int, device: torch.device):
        super().__init__()
        self.value = torch.zeros(in_features, device=device, dtype=torch.float32)

    def _add(self, x: torch.Tensor) -> None:
        self.value += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples


class Gram(_RunningMean):
    """``gram``: the Hessian proxy ``2/n * X^T X`` used by SparseGPT, streamed."""

    def __init__(self, in_features: int, device: torch.device):
        super().__init__()
        self.value = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)

    def _add(self, x: torch.Tensor) -> None:
        x = math.sqrt(2 / self.nsamples) * x
        self.value += x @ x.t()


STATS = {"col_sq_norm": ColumnSqNorm, "gram": Gram}


def make_accumulators(names: set[str], in_features: int, device: torch.device) -> dict:
    unknown = set(names) - set(STATS)
    if unknown:
        raise PluginError(f"unknown statistics requested: {sorted(unknown)}; available: {sorted(STATS)}")
    return {name: STATS[name](in_features, device) for name in sorted(names)}
