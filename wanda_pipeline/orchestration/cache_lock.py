"""A Prefect cache lock that the operating system releases when its process dies.

Sweep points on one machine share Prefect's local result storage, and their calibration
stage has the same cache key. Prefect writes a cached result with a plain ``open(..., "wb")``,
so with its default isolation a point could read another's half-written record and fail
(seen in CI as a sweep point failing at random). Caching under SERIALIZABLE isolation needs a
lock manager; Prefect's own ``FileSystemLockManager`` marks a lock with a file that nobody
removes when the holder is killed, and every later run would then wait forever. This one
holds an ``flock`` through :mod:`filelock`: a killed holder frees the lock at once.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from filelock import FileLock, Timeout


class ProcessLockManager:
    """Prefect's ``LockManager`` protocol over OS file locks in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._held: dict[str, tuple[str, FileLock]] = {}

    def __eq__(self, other: object) -> bool:  # Prefect compares the lock managers of combined policies
        return isinstance(other, ProcessLockManager) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    def _lock(self, key: str) -> FileLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:32]  # keys may hold path separators
        # not thread-local: Prefect's async engine may take the lock in one thread and release it in another
        return FileLock(self.directory / f"{name}.lock", thread_local=False, is_singleton=False)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """``hold_timeout`` is not needed: the lock lives exactly as long as its holder's process."""
        if self.is_lock_holder(key, holder):
            return True
        lock = self._lock(key)
        try:
            lock.acquire(timeout=-1 if acquire_timeout is None else acquire_timeout)
        except Timeout:
            return False
        self._held[key] = (holder, lock)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"no lock held by {holder} for transaction with key {key}")
        _, lock = self._held.pop(key)
        lock.release(force=True)

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        lock = self._lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release(force=True)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return key in self._held and self._held[key][0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody else holds ``key``'s lock (taking and dropping it at once)."""
        lock = self._lock(key)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            return False
        lock.release(force=True)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)
