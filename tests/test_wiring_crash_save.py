"""Crash consistency of the atomic save, a streamed prune's shard writes and the compressed-tensors
export, by fault injection (tests/fault_fs.py): every filesystem step fails in turn, raised and as a
``kill -9`` there. The destination then holds the old folder or the whole new one, never a folder
that looks complete but is not, and the next save cleans up and succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault_fs import as_killed, fail_at, recorded_steps
from wanda_pipeline.plugins import discover
from wanda_pipeline.tiny_models import tiny_model


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))


def check_save_crashes(tmp_path: Path, save, leftovers: frozenset[str] = frozenset(), select=None) -> None:
    """``save(out)`` over an old folder fails at each step; the old folder is kept (or the new one is
    whole), and the next save succeeds."""
    clean = tmp_path / "clean"
    save(clean / "out")
    new = folder_bytes(clean / "out")
    _old_folder(tmp_path / "rec")
    steps = recorded_steps(tmp_path / "rec", lambda: save(tmp_path / "rec" / "out"))
    assert any(s.startswith("rename") for s in steps), steps
    for i, step in enumerate(steps):
        if select is not None and not select(step):
            continue
        parent, killed = tmp_path / f"p{i}", tmp_path / f"killed{i}"
        old = _old_folder(parent)
        if fail_at(parent, i, killed, lambda parent=parent: save(parent / "out")):
            assert set(visible(parent)) - leftovers == {"out"} and folder_bytes(parent / "out") == old, step
            assert {p.name for p in parent.iterdir()} - leftovers == {"out"}, f"temporaries left after {step}"
        else:  # a best-effort cleanup step after the new folder went in
            assert set(visible(parent)) - leftovers == {"out"} and folder_bytes(parent / "out") == new, step
            killed = parent
        if killed.exists():
            as_killed(killed)
            assert set(visible(killed)) - leftovers <= {"out"}, step
            if (killed / "out").exists():  # a kill leaves the old folder or the whole new one
                assert folder_bytes(killed / "out") in (old, new), step
            save(killed / "out")  # the next save cleans up and succeeds
            assert {p.name for p in killed.iterdir()} - leftovers == {"out"}, step
            assert folder_bytes(killed / "out") == new


def _old_folder(parent: Path) -> dict[str, bytes]:
    (parent / "out").mkdir(parents=True)
    (parent / "out" / "old.txt").write_text("the previous model")
    return folder_bytes(parent / "out")


def test_a_failed_or_killed_hf_save_keeps_the_old_folder(tmp_path):
    from wanda_pipeline.saving import save_model

    model = tiny_model("llama", seed=1, layers=1)
    check_save_crashes(tmp_path, lambda out: save_model(model, None, out, {"run": 1}, overwrite=True))


def test_a_save_killed_between_its_two_renames_gets_the_old_folder_back(tmp_path):
    from wanda_pipeline.saving import atomic_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    steps = []

    def write(target):
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")

    steps = recorded_steps(tmp_path, lambda: write(out))
    second_rename = [i for i, s in enumerate(steps) if s.startswith("rename")][1]
    (tmp_path / "out").mkdir(exist_ok=True)
    for p in list((tmp_path / "out").iterdir()):
        p.unlink()
    (out / "old.txt").write_text("old")
    fail_at(tmp_path, second_rename, tmp_path.parent / "snap", lambda: write(out))
    assert folder_bytes(out) == {"old.txt": b"old"}  # the raised error put it back
    snap = tmp_path.parent / "snap"
    as_killed(snap)
    assert not (snap / "out").exists()  # a kill there leaves the old folder aside ...
    with pytest.raises(FileExistsError):  # ... and the next save puts it back before anything else
        write_no_overwrite(snap / "out")
    assert folder_bytes(snap / "out") == {"old.txt": b"old"}


def write_no_overwrite(target: Path) -> None:
    from wanda_pipeline.saving import atomic_folder

    with atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")


# --- the compressed-tensors export and the streamed shards --------------------------------------------


def test_a_failed_or_killed_compressed_tensors_export_never_looks_complete(tmp_path):
    from wanda_pipeline import stages
    from wanda_pipeline.config import EngineSpec
    from wanda_pipeline.export import save as export_save
    from wanda_pipeline.quantizers.rtn import RTNConfig, RTNQuantizer

    model = tiny_model("llama", seed=2, layers=1)
    quantizer = RTNQuantizer(RTNConfig(bits=4, group_size=32))
    stages.quantize(model, quantizer, EngineSpec())
    check_save_crashes(tmp_path, lambda out: export_save(model, None, out, "compressed-tensors", {"run": 1},
                                                         quantizer=quantizer, overwrite=True))


def test_a_failed_or_killed_streamed_prune_and_save_never_looks_complete(tmp_path, tiny_dir):
    from wanda_pipeline import stages
    from wanda_pipeline.config import PipelineSpec

    src = tiny_dir

    def run(out: Path) -> None:
        spec = PipelineSpec(model={"source": str(src)}, pruner={"name": "magnitude", "sparsity": 0.5},
                            engine={"stream": True}, save={"path": str(out), "overwrite": True})
        loaded = stages.load(spec.model, stream=True)
        plugins = stages.build_plugins(spec, discover())  # magnitude: no calibration
        stages.prune(loaded, None, plugins.pruner, spec, progress=False)
        stages.export_model(loaded, out, "hf", {"run": 1}, spec, overwrite=True)

    # The staging shards (out.partial, removed by run.execute after success) are rebuilt by every
    # streamed run. Faults go to the first block's shard, the outer weights, the index, the config
    # and the save's renames; the other steps are like them or those of the hf save above.
    def select(step: str) -> bool:
        kind, path = step.split()
        return kind == "rename" or path.startswith(("out.partial/model-block-00000", "out.partial/model-outer",
                                                    "out.partial/model.safetensors.index", "out.partial/config"))

    check_save_crashes(tmp_path, run, leftovers={"out.partial"}, select=select)
