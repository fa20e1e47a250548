"""Saves are atomic: a failure (or a signal) mid-write leaves neither a partial folder nor a
half-written destination, and an existing folder survives a failed overwrite."""

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
