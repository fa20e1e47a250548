"""MLflow's faults and first-time setup: the wrapper that turns a tracking call's error into ours,
and the lock under which a sqlite store is first opened."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wanda_pipeline.errors import TrackingError


def tracked(fn):
    """MLflow errors inside a run become TrackingError (exit 6) with the server named."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except TrackingError:
            raise
        except Exception as exc:
            from wanda_pipeline.errors import OutputError
            from wanda_pipeline.fault_map import classify

            mapped = classify(exc, hint=self.uri)
            if isinstance(mapped, OutputError):  # e.g. the disk under a local artifact store is full
                raise mapped from exc
            raise TrackingError(f"MLflow at {self.uri} failed in {fn.__name__}: {type(exc).__name__}: "
                                f"{str(exc)[:300]}") from exc

    return wrapper


@contextmanager
def first_setup(uri: str) -> Iterator[None]:
    """One process at a time opens a sqlite store: MLflow migrates a new file without a lock, and
    two runs starting together on one fresh file break each other's migration ("duplicate column").
    The lock file lives next to the database; an existing store holds it for milliseconds."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock, Timeout

    db = Path(uri.removeprefix("sqlite:///"))
    lock = FileLock(str(db.parent / f".{db.name}.lock"))
    try:
        lock.acquire(timeout=600)
    except Timeout:
        raise TrackingError(f"another process has held {lock.lock_file} for 10 minutes while opening {db}; "
                            f"if none is running, delete the lock file") from None
    try:
        yield
    finally:
        lock.release()
