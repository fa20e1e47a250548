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


def print_summary(summary: dict) -> None:
    rows = [{"metric": k, "value": v} for k, v in summary["metrics"].items()]
    print_table(rows, f"pipeline {summary['pipeline']}")
    reg = summary.get("registration")
    if reg:
        state = "PROMOTED to @" + reg["alias"] if reg["promoted"] else "registered, NOT promoted"
        print(f"model {reg['name']} version {reg['version']}: {state}")
        for g in reg.get("gates", []):
            print(f"  gate {g['name']}: {'pass' if g['passed'] else 'FAIL'} - {g['detail']}")
    if summary.get("mlflow_run_id"):
        print(f"mlflow run {summary['mlflow_run_id']} ({summary.get('tracking_uri')})")
