"""Uncertainty of the evaluation numbers, and paired comparisons between two models.

Pure functions over per-example values (numpy only, no torch, no MLflow), so the evaluators,
the gates and the tests share one implementation:

- :func:`mean_stderr`: the standard error of a mean (lm-eval's formula, ddof=1);
- :func:`perplexity_interval`: a bootstrap over evaluation windows, fixed seed;
- :func:`paired_replicates`: one paired bootstrap over examples that both models scored,
  stratified by task, which gives intervals for ratios and differences of the two models;
- :func:`mcnemar_exact`: the exact McNemar test for two accuracies on the same examples;
- :func:`min_paired_examples`: below this many examples no paired test reaches a confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# Metrics an evaluator logs next to a metric M: M_stderr, M_ci_low, M_ci_high, M_n, M_tokens.
COMPANIONS = ("_stderr", "_ci_low", "_ci_high", "_n", "_tokens")
BOOTSTRAP_ITERS = 2000
BOOTSTRAP_SEED = 0
_CHUNK = 200  # resamples drawn at once: bounds memory to _CHUNK x examples indices


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval at ``confidence`` over ``n`` examples."""

    point: float
    low: float
    high: float
    confidence: float
    n: int
    stderr: float = float("nan")

    def text(self, digits: int = 4) -> str:
        return (f"{self.point:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}] "
                f"({self.confidence:.0%}, n={self.n})")


def is_companion(key: str, metrics: dict) -> bool:
    """True for ``M_stderr`` and the like when ``M`` itself is in ``metrics`` (or ``M_acc`` for ``M_n``)."""
    for suffix in COMPANIONS:
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            if base in metrics or (suffix == "_n" and f"{base}_acc" in metrics):
                return True
    return False


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.96 at 0.95."""
    return NormalDist().inv_cdf((1 + confidence) / 2)


def mean_stderr(values: Sequence[float]) -> float:
    """sample std (ddof=1) / sqrt(n), as lm-eval's ``mean_stderr``; nan below two values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    return float(x.std(ddof=1) / math.sqrt(x.size))


def normal_interval(point: float, stderr: float, n: int, confidence: float = 0.95) -> Interval:
    h = z_value(confidence) * stderr if math.isfinite(stderr) else float("nan")
    return Interval(point, point - h, point + h, confidence, n, stderr)


def mean_of_tasks_stderr(stderrs: Sequence[float]) -> float:
    """Standard error of an equal-weight mean of independent task means: sqrt(sum se^2) / T."""
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def _resampled_means(values: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """(iters, columns) means of ``values`` (n, columns) over resampled rows."""
    out = np.empty((iters, values.shape[1]))
    for start in range(0, iters, _CHUNK):
        k = min(_CHUNK, iters - start)
        idx = rng.integers(0, values.shape[0], size=(k, values.shape[0]))
        out[start : start + k] = values[idx].mean(axis=1)
    return out


def paired_replicates(groups: Sequence[tuple[Sequence[float], Sequence[float]]], iters: int = BOOTSTRAP_ITERS,
                      seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates of the equal-weight mean of group means, for two models at once.

    Each group (a task, or the windows of one text) holds the two models' values on the SAME
    examples in the same order; each replicate resamples the examples of every group once and
    uses that resample for both models, which is what makes it paired. Returns (a, b)."""
    rng = np.random.default_rng(seed)
    a = np.zeros(iters)
    b = np.zeros(iters)
    for va, vb in groups:
        pair = np.stack([np.asarray(va, np.float64), np.asarray(vb, np.float64)], axis=1)
        if pair.shape[0] == 0:
            raise ValueError("a group with no examples")
        means = _resampled_means(pair, iters, rng)
        a += means[:, 0]
        b += means[:, 1]
    return a / len(groups), b / len(groups)


def percentile_interval(point: float, replicates: np.ndarray, confidence: float, n: int) -> Interval:
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(point, float(low), float(high), confidence, n, float(np.std(replicates, ddof=1)))


def perplexity_interval(window_nll: Sequence[float], confidence: float = 0.95, iters: int = BOOTSTRAP_ITERS,
                        seed: int = BOOTSTRAP_SEED) -> Interval:
    """exp(mean window NLL) with a bootstrap interval over the windows (all of one length)."""
    nll = np.asarray(window_nll, dtype=np.float64)
    point = math.exp(float(nll.mean()))
    if nll.size < 2:
        return Interval(point, float("nan"), float("nan"), confidence, int(nll.size))
    reps = np.exp(_resampled_means(nll[:, None], iters, np.random.default_rng(seed))[:, 0])
    return percentile_interval(point, reps, confidence, int(nll.size))


def paired_log_ratio(a_nll: Sequence[float], b_nll: Sequence[float], confidence: float,
                     iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED) -> Interval:
    """The perplexity ratio a/b = exp(mean(a) - mean(b)) over the same windows, paired bootstrap."""
    ra, rb = paired_replicates([(a_nll, b_nll)], iters, seed)
    point = math.exp(float(np.mean(a_nll)) - float(np.mean(b_nll)))
    return percentile_interval(point, np.exp(ra - rb), confidence, len(a_nll))


def paired_accuracy(groups: Sequence[tuple[Sequence[float], Sequence[float]]], confidence: float,
                    iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED) -> tuple[Interval, Interval]:
    """(difference a - b, ratio a / b) of the equal-weight mean of task accuracies, paired."""
    ra, rb = paired_replicates(groups, iters, seed)
    ma = float(np.mean([np.mean(a) for a, _ in groups]))
    mb = float(np.mean([np.mean(b) for _, b in groups]))
    n = sum(len(a) for a, _ in groups)
    diff = percentile_interval(ma - mb, ra - rb, confidence, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_reps = np.where(rb > 0, ra / np.where(rb > 0, rb, 1), np.inf)
    ratio = percentile_interval(ma / mb if mb else math.inf, ratio_reps, confidence, n)
    return diff, ratio


def discordant(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """(examples only a got right, examples only b got right)."""
    x, y = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return int(np.sum(x & ~y)), int(np.sum(~x & y))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(only_a + only_b, 1/2) test on the discordant pairs."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def min_paired_examples(confidence: float) -> int:
    """The fewest paired examples with which a two-sided test CAN reach ``confidence``.

    The most lopsided outcome of n pairs (all n disagreements favour one model) has exact
    p = 2 * 0.5^n; it must be at most 1 - confidence: n >= log2(2 / (1 - confidence))."""
    return math.ceil(math.log2(2.0 / (1.0 - confidence)) - 1e-12)
