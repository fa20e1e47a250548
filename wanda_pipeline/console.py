"""Printing tables and run summaries for the CLI."""

from __future__ import annotations

from typing import Any


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def print_table(rows: list[dict], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    for c in cols:
        table.add_column(str(c))
    for r in rows:
        table.add_row(*[fmt(r.get(c)) for c in cols])
    Console(width=160).print(table)


def metric_rows(metrics: dict[str, float]) -> list[dict]:
    """One row per metric; its stderr, 95% interval and n (logged as companions) go in columns."""
    from wanda_pipeline.intervals import is_companion

    rows = []
    for k, v in metrics.items():
        if is_companion(k, metrics):
            continue
        row: dict[str, Any] = {"metric": k, "value": v}
        se = metrics.get(f"{k}_stderr")
        if se is not None:
            row["± stderr"] = se
        if f"{k}_ci_low" in metrics:
            row["95% interval"] = f"[{fmt(metrics[f'{k}_ci_low'])}, {fmt(metrics.get(f'{k}_ci_high'))}]"
        elif se is not None:  # a task's accuracy: the normal interval, as lm-eval's stderr implies
            row["95% interval"] = f"[{fmt(v - 1.96 * se)}, {fmt(v + 1.96 * se)}]"
        n = metrics.get(f"{k}_n", metrics.get(f"{k.rsplit('_acc', 1)[0]}_n") if "_acc" in k else None)
        if n is not None:
            row["n"] = int(n)
        rows.append(row)
    return rows


def print_summary(summary: dict) -> None:
    rows = metric_rows(summary["metrics"])
    print_table(rows, f"pipeline {summary['pipeline']}")
    reg = summary.get("registration")
    if reg:
        state = "PROMOTED to @" + reg["alias"] if reg["promoted"] else "registered, NOT promoted"
        print(f"model {reg['name']} version {reg['version']}: {state}")
        for g in reg.get("gates", []):
            print(f"  gate {g['name']}: {'pass' if g['passed'] else 'FAIL'} - {g['detail']}")
    if summary.get("mlflow_run_id"):
        print(f"mlflow run {summary['mlflow_run_id']} ({summary.get('tracking_uri')})")
