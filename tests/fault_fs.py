"""Fault injection for multi-file writes: every filesystem step under a root folder (a write, a
rename or replace, an unlink, a mkdir, a link) is counted, and step ``fail_at`` fails.

Before the failing step the root is copied to ``snapshot``: what a ``kill -9`` at that moment
would leave (no ``except``/``finally`` runs after a kill, but does after the raised error). A
failing write writes half its data first, as a full disk does.

    with FaultFS(root) as rec:            # record the steps of a clean run
        operation()
    with FaultFS(root, fail_at=3, snapshot=tmp / "killed"):
        operation()                        # raises InjectedFault (an OSError) at step 3
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

_REAL = {"open": io.open, "replace": os.replace, "rename": os.rename, "unlink": os.unlink, "remove": os.remove,
         "rmdir": os.rmdir, "mkdir": os.mkdir, "link": os.link}


class InjectedFault(OSError):
    def __init__(self, step: str):
        super().__init__(errno.ENOSPC, f"injected fault at {step}")


class _HalfWriter:
    """A file whose first write stores half the data, snapshots the root, then fails (disk full)."""

    def __init__(self, real, step: str, fs: FaultFS):
        self._real, self._step, self._fs = real, step, fs

    def write(self, data):
        self._real.write(data[: len(data) // 2])
        self._real.flush()
        self._fs.take_snapshot()
        raise InjectedFault(self._step)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()
        return False


class FaultFS:
    def __init__(self, root: str | Path, fail_at: int | None = None, snapshot: str | Path | None = None):
        self.root = os.path.realpath(root)
        self.fail_at = fail_at
        self.snapshot = Path(snapshot) if snapshot is not None else None
        self.steps: list[str] = []
        self._patches: list = []
        self._quiet = False

    def _path(self, path, dir_fd=None) -> str | None:
        if isinstance(path, int):
            return None
        p = os.fsdecode(path)
        if dir_fd is not None:
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        return os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(p)), os.path.basename(p)))

    def _step(self, kind: str, path, dir_fd=None) -> bool:
        """Count the step if it is under root; True if it is the one that must fail."""
        if self._quiet:
            return False
        p = self._path(path, dir_fd)
        if p is None or not (p == self.root or p.startswith(self.root + os.sep)):
            return False
        name = f"{kind} {os.path.relpath(p, self.root)}"
        self.steps.append(name)
        if len(self.steps) - 1 != self.fail_at:
            return False
        if kind != "write":  # a write snapshots after its half
            self.take_snapshot()
        return True

    def take_snapshot(self) -> None:
        if self.snapshot is None or not os.path.exists(self.root):
            return
        self._quiet = True  # the copy's own steps are not counted
        try:
            shutil.copytree(self.root, self.snapshot, symlinks=True)
        finally:
            self._quiet = False

    def _fail(self, kind: str, path, dir_fd=None):
        raise InjectedFault(f"step {len(self.steps) - 1}: {self.steps[-1]}")

    def __enter__(self) -> FaultFS:
        fs = self

        def opener(file, mode="r", *args, **kwargs):
            writing = isinstance(mode, str) and any(c in mode for c in "wax+")
            if writing and fs._step("write", file):
                real = _REAL["open"](file, mode, *args, **kwargs)
                return _HalfWriter(real, fs.steps[-1], fs)
            return _REAL["open"](file, mode, *args, **kwargs)

        def one_path(kind):
            def call(path, *args, dir_fd=None, **kwargs):
                # mkdir of an existing folder changes nothing (the caller ignores its error): no step
                noop = kind == "mkdir" and dir_fd is None and os.path.isdir(path)
                if not noop and fs._step(kind, path, dir_fd):
                    fs._fail(kind, path)
                if dir_fd is not None:
                    kwargs["dir_fd"] = dir_fd
                return _REAL[kind](path, *args, **kwargs)
            return call

        def two_paths(kind):
            def call(src, dst, *args, **kwargs):
                hit = fs._step(kind, dst if kind == "link" else src, kwargs.get("src_dir_fd"))
                if hit:
                    fs._fail(kind, src)
                return _REAL[kind](src, dst, *args, **kwargs)
            return call

        self._patches = [
            mock.patch.object(io, "open", opener), mock.patch.object(builtins, "open", opener),
            mock.patch.object(os, "replace", two_paths("replace")),
            mock.patch.object(os, "rename", two_paths("rename")), mock.patch.object(os, "link", two_paths("link")),
            mock.patch.object(os, "unlink", one_path("unlink")), mock.patch.object(os, "remove", one_path("remove")),
            mock.patch.object(os, "rmdir", one_path("rmdir")), mock.patch.object(os, "mkdir", one_path("mkdir")),
        ]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc) -> bool:
        for p in reversed(self._patches):
            p.stop()
        return False


def recorded_steps(root: str | Path, operation) -> list[str]:
    """The filesystem steps ``operation()`` takes under ``root`` when nothing fails."""
    with FaultFS(root) as rec:
        operation()
    return rec.steps


def injected(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, InjectedFault):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def fail_at(root: Path, step: int, snapshot: Path | None, operation) -> bool:
    """Run ``operation`` with step ``step`` failing; True if the fault surfaced as an error."""
    with FaultFS(root, fail_at=step, snapshot=snapshot) as fs:
        try:
            operation()
        except Exception as exc:
            assert injected(exc), f"step {step} failed with something else: {exc!r}"
            return True
    # allowed to swallow it: removing hidden temporaries, and a hard link (a copy is made instead)
    assert fs.steps[step].startswith(("unlink .", "rmdir .", "link ")), f"{fs.steps[step]} swallowed it"
    return False


def as_killed(folder: Path) -> None:
    """The snapshot was taken in this (live) process; make its temporaries a dead process's."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for path in sorted(folder.rglob(f"*-{os.getpid()}"), key=lambda p: -len(p.parts)):
        path.rename(path.with_name(path.name.replace(f"-{os.getpid()}", f"-{dead}")))
