"""Order statistics of small column groups by a min/max network: the N:M mask kernel.

Elementwise ``minimum``/``maximum`` over whole tensors, so it vectorises on any device
and never depends on how a sort or ``topk`` breaks ties.
"""

from __future__ import annotations

import functools

import torch


def nth_pair(groups: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n-th and (n+1)-th smallest value of each group (NaN where a group holds NaN)."""
    wires = list(groups.unbind(-1))
    for i, j, low, high in selection_network(n, m):
        a, b = wires[i], wires[j]
        if low:
            wires[i] = torch.minimum(a, b)
        if high:
            wires[j] = torch.maximum(a, b)
    return wires[n - 1], wires[n]


@functools.cache
def selection_network(n: int, m: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Batcher's odd-even merge sort on the next power of two, cut to ``m`` wires (the
    padding wires would hold +inf and never swap) and to the comparators that feed wires
    n-1 and n; each keeps only the min or max output that is used later."""
    size = 1 << (m - 1).bit_length()
    comparators = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < m:
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = {n - 1, n}, []
    for i, j in reversed(comparators):
        if i in needed or j in needed:
            kept.append((i, j, i in needed, j in needed))
            needed |= {i, j}
    return tuple(reversed(kept))
