"""A small, dependency-free check of 5-field cron expressions (what Prefect's Cron accepts)."""

from __future__ import annotations

_FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]
_NAMES = {
    3: {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    4: {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())},
}
_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _value(text: str, index: int) -> int:
    names = _NAMES.get(index, {})
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number")
    return int(text)


def _check_item(item: str, index: int) -> None:
    name, lo, hi = _FIELDS[index]
    base, _, step = item.partition("/")
    if step and (not step.isdigit() or int(step) == 0):
        raise ValueError(f"{name}: step {step!r} must be a positive number")
    if base == "*":
        return
    first, _, last = base.partition("-")
    values = [_value(first, index)] + ([_value(last, index)] if last else [])
    for v in values:
        if not lo <= v <= hi:
            raise ValueError(f"{name}: {v} is outside {lo}-{hi}")
    if len(values) == 2 and values[0] > values[1]:
        raise ValueError(f"{name}: range {base!r} runs backwards")


def check_cron(expr: str) -> str | None:
    """None if ``expr`` is a valid cron expression, else what is wrong with it."""
    if expr.strip().lower() in _MACROS:
        return None
    fields = expr.split()
    if len(fields) != 5:
        return f"it has {len(fields)} fields; cron needs 5 (minute hour day-of-month month day-of-week)"
    try:
        for index, field in enumerate(fields):
            for item in field.split(","):
                _check_item(item, index)
    except ValueError as exc:
        return str(exc)
    return None
