"""The cached calibration stage under concurrency: one writer, the others wait and read its
finished record; a killed lock holder frees the lock at once (no run waits forever)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from wanda_pipeline.orchestration.cache_lock import ProcessLockManager
from wanda_pipeline.orchestration.compress import cached_policy

HOLD = """
import sys, time
from wanda_pipeline.orchestration.cache_lock import ProcessLockManager
m = ProcessLockManager(sys.argv[1])
assert m.acquire_lock("calibrate-key", "child")
print("held", flush=True)
time.sleep(120)
"""

TRY = """
import sys
from wanda_pipeline.orchestration.cache_lock import ProcessLockManager
print(ProcessLockManager(sys.argv[1]).acquire_lock("calibrate-key", "probe", acquire_timeout=2))
"""


def hold_in_child(directory):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_lock_held_by_another_process_is_seen_and_freed_when_that_process_is_killed(tmp_path):
    m = ProcessLockManager(tmp_path)
    child = hold_in_child(tmp_path)
    try:
        assert m.is_locked("calibrate-key") and not m.is_locked("other-key")
        assert m.wait_for_lock("calibrate-key", timeout=0.3) is False
        assert m.acquire_lock("calibrate-key", "me", acquire_timeout=0.3) is False
        child.send_signal(signal.SIGKILL)  # kill -9 in the middle of a write: no stale lock file blocks anyone
        child.wait(10)
        assert m.wait_for_lock("calibrate-key", timeout=5) is True
        assert m.acquire_lock("calibrate-key", "me", acquire_timeout=5)
    finally:
        child.kill()
    assert m.is_lock_holder("calibrate-key", "me") and not m.is_lock_holder("calibrate-key", "you")
    with pytest.raises(ValueError, match="no lock held by you"):
        m.release_lock("calibrate-key", "you")
    m.release_lock("calibrate-key", "me")
    assert not m.is_locked("calibrate-key")


def test_the_cached_stage_is_serialisable_under_this_lock_manager():
    policy = cached_policy("k")
    assert str(policy.isolation_level).upper().endswith("SERIALIZABLE")
    assert isinstance(policy.lock_manager, ProcessLockManager)
    assert policy.compute_key(None, {}, {}) == "k"


POINT = """
import sys, time
from pathlib import Path
from prefect import flow
from wanda_pipeline.orchestration.compress import prefect_stage

def calibrate(n):
    with Path(sys.argv[1]).open("a") as f:
        f.write("computed\\n")
    time.sleep(3)  # long enough that the other point looks for the record meanwhile
    return list(range(n))

@flow(name="point")
def point():
    return prefect_stage("calibrate", calibrate, 200_000, cache_key=sys.argv[2])

r = point()
print(len(r), r[-1])
"""


@pytest.mark.slow
def test_concurrent_points_compute_a_cached_stage_once_and_both_read_it(prefect_harness, tmp_path):
    """Two processes sharing Prefect's result storage, as two sweep workers on one machine do."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "storage")}
    calls, key = tmp_path / "calls", f"calibration-{time.time_ns()}"
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen([sys.executable, "-c", POINT, str(calls), key], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        time.sleep(0.5)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert [o[0].split()[-2:] for o in outs] == [["200000", "199999"]] * 2
    assert calls.read_text().split() == ["computed"], "the second point computed the stage again instead of waiting"


def test_the_async_calls_wait_for_another_process_too(tmp_path):
    import asyncio

    m = ProcessLockManager(tmp_path)
    child = hold_in_child(tmp_path)
    try:
        assert asyncio.run(m.await_for_lock("calibrate-key", timeout=0.3)) is False
        assert asyncio.run(m.aacquire_lock("calibrate-key", "me", acquire_timeout=0.3)) is False
    finally:
        child.kill()
        child.wait(10)
    assert asyncio.run(m.aacquire_lock("calibrate-key", "me", acquire_timeout=5)) is True
    assert m.is_lock_holder("calibrate-key", "me")
    m.release_lock("calibrate-key", "me")


def test_a_lock_taken_in_one_thread_is_released_from_another(tmp_path):
    """Prefect's async engine takes the lock in a worker thread and may release it elsewhere."""
    import threading

    m, taken, done = ProcessLockManager(tmp_path), threading.Event(), threading.Event()

    def take():  # the thread stays alive, as an event loop's worker thread does
        m.acquire_lock("calibrate-key", "me")
        taken.set()
        done.wait(30)

    taker = threading.Thread(target=take)
    taker.start()
    try:
        assert taken.wait(10) and m.is_lock_holder("calibrate-key", "me")
        m.release_lock("calibrate-key", "me")
        probe = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() == "True", probe.stderr[-2000:]
    finally:
        done.set()
        taker.join(10)
