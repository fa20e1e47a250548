"""Pure mask functions: tensors in, boolean masks out.

A mask is ``True`` where a weight is *pruned* (set to zero), as in the reference
code. Computing a mask and applying it are separate steps so tests, the
conformance kit, OWL and the quantizer's sparsity check can reuse them.
"""

from __future__ import annotations

import torch

from wanda_pipeline.errors import ConfigError
from wanda_pipeline.selection_network import nth_pair

# Row chunks of about this many elements keep the N:M network's temporaries in cache
# (on CPU) and bound the int64 cumsum of the tie fix-up.
_CHUNK_ELEMS = 1 << 19
# Above this M the selection network has too many comparators; topk does the whole matrix.
_MAX_NETWORK_M = 32


def check_ratio(sparsity: float) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(
            f"sparsity must be in [0, 1), got {sparsity}. Use e.g. 0.5 for 50% of weights pruned."
        )


def check_nm(n: int, m: int) -> None:
    if m <= 0 or n <= 0 or n >= m:
        raise ConfigError(
            f"N:M sparsity needs 0 < N < M, got {n}:{m}. Use e.g. 2:4 (prune 2 of every 4)."
        )


def wanda_metric(weight: torch.Tensor, col_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||: ``col_sq_norm`` holds the (scaled) squared L2 norm of each input column."""
    return weight.abs() * torch.sqrt(col_sq_norm.reshape(1, -1).to(weight.dtype))


def per_row_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(C_in * s)`` lowest-scoring weights of each output row.

    Same mask as a stable sort (ties go to the lower column index, NaN counts as largest),
    found with a per-row ``kthvalue`` threshold; only rows with ties at the threshold
    pay for the exact tie rule.
    """
    check_ratio(sparsity)
    k = int(metric.shape[1] * sparsity)
    if k == 0:
        return torch.zeros_like(metric, dtype=torch.bool)
    try:
        thresh = torch.kthvalue(metric, k, dim=1, keepdim=True).values
    except (NotImplementedError, RuntimeError):  # a backend without kthvalue
        return _stable_lowest(metric, k)
    mask = metric <= thresh
    odd = (mask.sum(1) != k).nonzero().flatten()
    for chunk in odd.split(max(1, _CHUNK_ELEMS // metric.shape[1])):
        mask[chunk] = _ties_by_index(metric[chunk], thresh[chunk], k)
    return mask


def _stable_lowest(metric: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest of each row by a stable sort: the definition the fast paths must match."""
    order = torch.sort(metric, dim=-1, stable=True)[1]
    return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, order[:, :k], True)


def _ties_by_index(metric: torch.Tensor, thresh: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th value ties: everything below it, then the tied ones from the left."""
    below = metric < thresh
    tied = metric == thresh
    need = k - below.sum(1, keepdim=True)
    mask = below | (tied & (tied.cumsum(1) <= need))
    bad = (mask.sum(1) != k).nonzero().flatten()  # NaN thresholds: leave those rows to the sort
    if bad.numel():
        mask[bad] = _stable_lowest(metric[bad], k)
    return mask


def per_layer_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(numel * s)`` lowest-scoring weights of the whole matrix.

    Exactly k weights go, as with a stable sort over the flattened matrix (ties go to the
    lower flat index); the reference's ``metric <= threshold`` can prune more than k when
    there are ties.
    """
    check_ratio(sparsity)
    k = int(metric.numel() * sparsity)
    flat = metric.reshape(-1)
    if k == 0:
        return torch.zeros_like(metric, dtype=torch.bool)
    try:
        thresh = torch.kthvalue(flat, k).values
    except (NotImplementedError, RuntimeError):
        thresh = torch.tensor(float("nan"))
    if torch.isnan(thresh):
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.sort(flat, stable=True)[1][:k]] = True
        return mask.view_as(metric)
    mask = flat <= thresh
    if int(mask.sum()) != k:
        mask = flat < thresh
        need = k - int(mask.sum())
        mask[(flat == thresh).nonzero().flatten()[:need]] = True
    return mask.view_as(metric)


def nm_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest of every ``m`` consecutive input columns.

    The same mask as ``topk(largest=False)`` on each group (the reference's rule). Each
    group's n-th and (n+1)-th smallest values come from a min/max selection network,
    in row chunks that stay in cache; where they differ the mask is ``metric <= n-th``,
    and only groups where they tie (or hold NaN) go through ``topk`` itself, so its
    tie rule is kept. Trailing columns that do not fill a group of ``m`` stay dense.
    """
    check_nm(n, m)
    rows, cols = metric.shape
    full = (cols // m) * m
    if full == 0:
        return torch.zeros_like(metric, dtype=torch.bool)
    groups = metric[:, :full].reshape(rows, full // m, m)
    if m > _MAX_NETWORK_M:
        gmask = _topk_groups(groups, n)
    else:
        gmask = torch.empty(groups.shape, dtype=torch.bool, device=metric.device)
        ties = torch.empty(groups.shape[:2], dtype=torch.bool, device=metric.device)
        # Row chunks keep the temporaries in CPU caches; a GPU takes the matrix at once.
        step = max(1, _CHUNK_ELEMS // full) if metric.device.type == "cpu" else rows
        for r in range(0, rows, step):
            lo, hi = nth_pair(groups[r : r + step], n, m)
            torch.le(groups[r : r + step], lo.unsqueeze(-1), out=gmask[r : r + step])
            torch.logical_or(lo == hi, torch.isnan(lo), out=ties[r : r + step])
        if ties.any():
            if metric.device.type == "cpu":  # CPU topk picks per group, whatever the batch shape
                where = ties.nonzero(as_tuple=True)
                gmask[where] = _topk_groups(groups[where], n)
            else:
                gmask = _topk_groups(groups, n)
    if full == cols:
        return gmask.view(rows, cols)
    mask = torch.zeros_like(metric, dtype=torch.bool)
    mask[:, :full] = gmask.view(rows, full)
    return mask


def _topk_groups(groups: torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.topk(groups.float(), n, dim=-1, largest=False)[1]
    return torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(-1, idx, True)


def variant_mask(
    metric: torch.Tensor, sparsity: float, tol: float = 0.001
) -> tuple[torch.Tensor, float, float]:
    """The reference's Wanda variant: per-row threshold at a fraction ``alpha`` of the
    row's cumulative sorted metric, with ``alpha`` found by bisection so the whole
    matrix reaches ``sparsity`` within ``tol``. Returns (mask, alpha, achieved)."""
    check_ratio(sparsity)
    sorted_vals, _ = torch.sort(metric, dim=-1, stable=True)
    cumsum = torch.cumsum(sorted_vals, dim=1)
    row_sum = metric.sum(dim=1)

    def given_alpha(alpha: float) -> tuple[torch.Tensor, float]:
        keep_below = cumsum <= (row_sum * alpha).reshape(-1, 1)
        idx = keep_below.sum(dim=1, keepdim=True) - 1
        thres = torch.gather(sorted_vals, 1, idx.clamp(min=0))
        # A row where even the smallest weight exceeds alpha*sum prunes nothing.
        thres = torch.where(idx < 0, torch.full_like(thres, -torch.inf), thres)
        mask = metric <= thres
        return mask, float(mask.sum()) / mask.numel()

    alpha, lo, hi = 0.4, 0.0, 0.8
    mask, achieved = given_alpha(alpha)
    while abs(achieved - sparsity) > tol and hi - lo >= tol:
        if achieved > sparsity:
            hi, alpha = alpha, (alpha + lo) / 2.0
        else:
            lo, alpha = alpha, (alpha + hi) / 2.0
        mask, achieved = given_alpha(alpha)
    return mask, alpha, achieved


def select_mask(
    metric: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    group: str = "output",
) -> torch.Tensor:
    """Dispatch on the sparsity pattern: ``unstructured`` or ``N:M``; ``group`` is the
    comparison group for unstructured masks (``output`` row or whole ``layer``)."""
    nm = parse_pattern(pattern)
    if nm is not None:
        return nm_mask(metric, *nm)
    if group == "output":
        return per_row_mask(metric, sparsity)
    if group == "layer":
        return per_layer_mask(metric, sparsity)
    raise ConfigError(f"unknown comparison group {group!r}; use 'output' or 'layer'")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``"unstructured"`` -> None."""
    if pattern == "unstructured":
        return None
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ConfigError(
            f"unknown sparsity pattern {pattern!r}; use 'unstructured' or 'N:M' such as '2:4'"
        ) from None
    check_nm(n, m)
    return n, m


def pattern_sparsity(pattern: str, sparsity: float) -> float:
    """The sparsity a pattern actually targets (N:M fixes it to N/M)."""
    nm = parse_pattern(pattern)
    return nm[0] / nm[1] if nm else sparsity


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the masked weights in place (``masked_fill_``: no index list, unlike ``w[mask] = 0``)."""
    weight.masked_fill_(mask, 0)


def respects_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every full group of ``m`` input columns has at least ``n`` zeros."""
    rows, cols = weight.shape
    full = (cols // m) * m
    zeros = (weight[:, :full] == 0).reshape(rows, full // m, m).sum(-1)
    return bool((zeros >= n).all())


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()
