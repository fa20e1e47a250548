"""Saves are atomic: a failure (or a signal) mid-write leaves neither a partial folder nor a
half-written destination, and an existing folder survives a failed overwrite."""

import os
import socket
import subprocess
import sys

import pytest

from wanda_pipeline.errors import Interrupted
from wanda_pipeline.saving import atomic_folder, save_model


def test_failure_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(Interrupted):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise Interrupted()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder_and_success_replaces_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_folder(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").exists()
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_model_refuses_to_merge_into_a_non_empty_folder(tmp_path):
    from wanda_pipeline.tiny_models import tiny_model

    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_model(tiny_model("llama"), None, out, {})
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_save_is_cleaned_up_by_the_next_save_to_the_same_place(tmp_path):
    out = tmp_path / "model"
    # a real kill -9 in the middle of a save
    code = ("import os, signal, sys\nfrom wanda_pipeline.saving import atomic_folder\n"
            "with atomic_folder(sys.argv[1]) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code, str(out)], check=False)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.partial-")
    host = socket.gethostname()
    keep = [f".model.partial-{host}-{os.getppid()}",    # a live process is still writing it
            f".model.partial-otherhost-{_dead_pid()}",   # another host's: its PID means nothing here
            f".other.partial-{host}-{_dead_pid()}"]      # another destination's
    for name in keep + [f".model.old-{host}-{_dead_pid()}"]:
        (tmp_path / name).mkdir()
    with atomic_folder(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["model"])
    assert (out / "model.safetensors").read_bytes() == b"whole"
