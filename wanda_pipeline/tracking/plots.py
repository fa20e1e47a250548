"""PNG figures for tracking: per-layer sparsity, and perplexity against sparsity."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def sparsity_figure(rows: list[dict], targets: list[float] | None = None):
    blocks = sorted({r["block"] for r in rows})
    achieved = [sum(r["zeros"] for r in rows if r["block"] == b) / sum(r["numel"] for r in rows if r["block"] == b)
                for b in blocks]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(blocks, achieved, label="achieved", color="#4C72B0")
    if targets:
        ax.plot(range(len(targets)), targets, "k.--", label="target")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity of its linears")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def sweep_figure(table: list[dict], metric: str):
    """``metric`` against sparsity: the measured one where the sparsity evaluator ran, else the target."""
    fig, ax = plt.subplots(figsize=(6, 4))
    measured = all("sparsity_total" in r for r in table if metric in r)
    x = "sparsity_total" if measured else "target"
    for name in sorted({r["pipeline"] for r in table}):
        pts = sorted((r[x], r[metric]) for r in table if r["pipeline"] == name and metric in r and r.get(x) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel("sparsity" if measured else "target sparsity (not measured: no 'sparsity' evaluator)")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return fig
