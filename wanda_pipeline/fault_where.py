"""Where an exception comes from: the links of its chain, the library whose code raised it, and
the file or URL it is about. Used by :mod:`wanda_pipeline.fault_map`'s rows and messages."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes and contexts, outermost first, each once."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def is_a(exc: BaseException, *names: str) -> bool:
    """Whether ``exc``'s class, or a base, is one of ``names`` (``module.Class`` or bare ``Class``)."""
    for cls in type(exc).__mro__:
        if f"{cls.__module__}.{cls.__qualname__}" in names or cls.__qualname__ in names:
            return True
    return False


def raised_in(exc: BaseException) -> list[str]:
    """The files of the frames that raised ``exc``, innermost first."""
    files, tb = [], exc.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename.replace(os.sep, "/"))
        tb = tb.tb_next
    return files[::-1]


# Packages that only carry a call (HTTP, arrays): the library that called them is the one at fault.
_CARRIERS = ("httpx/", "httpcore/", "anyio/", "requests/", "urllib3/", "h11/", "sniffio/", "numpy/")


def origin(exc: BaseException) -> str:
    """Where ``exc`` was raised: the innermost frame's path below site-packages (``"gguf/gguf_reader.py"``),
    skipping the standard library and carriers; ``"wanda_pipeline"`` for this project's code."""
    for f in raised_in(exc):
        if "/wanda_pipeline/" in f and "-packages/" not in f:
            return "wanda_pipeline"
        if "-packages/" not in f:
            continue  # the standard library, a test, <stdin>
        inside = f.split("-packages/", 1)[1]
        if not inside.startswith(_CARRIERS):
            return inside
    return ""


def raised_by(exc: BaseException, *packages: str) -> bool:
    """Whether ``exc`` was raised inside one of ``packages`` (path prefixes below site-packages)."""
    return origin(exc).startswith(packages)


_NAME_HINTS = ("file", "path", "filename", "fname", "checkpoint", "gguf", "json_file", "resolved")


def _frame_file(exc: BaseException) -> str | None:
    """A file path held by one of the innermost library frames (how the file behind a JSON,
    safetensors or GGUF error is found: the library had it in a local variable)."""
    for e in chain(exc):
        tb, frames = e.__traceback__, []
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in frames[::-1][:12]:
            for key, value in list(frame.f_locals.items()):
                if any(h in key.lower() for h in _NAME_HINTS):
                    if isinstance(value, io.IOBase):  # an open file: its path
                        value = getattr(value, "name", None)
                    if isinstance(value, (str, os.PathLike)) and len(str(value)) < 4096 and Path(value).is_file():
                        return str(value)
    return None


def where(exc: BaseException, hint: str | None = None) -> str | None:
    """The file or URL a fault is about: the OS error's file name, the request's URL, a file a
    library frame held, else ``hint`` (the stage's input, the tracking URI), else a URL in the message."""
    for e in chain(exc):
        value = (getattr(e, "filename", None) or getattr(e, "filename2", None)) if isinstance(e, OSError) else None
        url = getattr(getattr(e, "request", None), "url", None)
        if value or url:
            return str(value or url)
    found = _frame_file(exc) or hint
    if found:
        return found
    for e in chain(exc):
        for url in re.findall(r"https?://[^\s'\"()<>]+", str(e)):
            if "docs" not in url and "mlflow.org" not in url:  # a link to a manual is not the place
                return url.rstrip(".,;:/")
    return None


