"""Crash consistency by fault injection (tests/fault_fs.py): every filesystem step of a checkpoint
commit, an atomic save, a streamed prune and a compressed-tensors export fails in turn. Two states
follow each fault: the folder after the raised error, and a copy taken just before the step (what a
``kill -9`` there leaves). From both, the next run resumes to the uninterrupted result or starts
clean with a clear message: never a checkpoint that cannot resume, never a folder that looks
complete but is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fault_fs import FaultFS, InjectedFault, recorded_steps
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.engine.checkpoint import MANIFEST, Checkpoint, remove_checkpoint
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.plugins import discover
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.tiny_models import tiny_model

BLOCKS = 3
TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def injected(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, InjectedFault):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def fail_at(root: Path, step: int, snapshot: Path, operation) -> bool:
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


# --- the checkpoint commit --------------------------------------------------------------------------


def pruned(ckpt: Path | None, resume: bool = True) -> dict[str, torch.Tensor]:
    model = tiny_model("llama", seed=3, layers=BLOCKS)
    prune_model(model, TOKENS, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False),
                checkpoint_dir=ckpt, resume=resume)
    return model.state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_step_of_a_checkpointed_run_can_fail_and_the_next_run_resumes(tmp_path):
    reference = pruned(None)
    steps = recorded_steps(tmp_path / "clean", lambda: pruned(tmp_path / "clean"))
    kinds = {s.split()[0] for s in steps}
    assert {"write", "replace", "unlink", "mkdir"} <= kinds and len(steps) >= 3 * BLOCKS + 2, steps
    for i, step in enumerate(steps):
        ck, killed = tmp_path / f"ck{i}", tmp_path / f"killed{i}"
        fail_at(ck, i, killed, lambda ck=ck: pruned(ck))
        for state in (ck, killed):
            # resumes (or starts clean) by itself: no --no_resume needed, and the same weights
            assert same(pruned(state), reference), f"after a fault at {step} ({state.name})"
            left = sorted(p.name for p in state.iterdir())
            assert left == [f"block-{b:05d}.safetensors" for b in range(BLOCKS)] + [MANIFEST], (step, left)


def test_starting_over_on_another_runs_checkpoint_can_fail_at_any_step(tmp_path):
    """--no_resume over an old run's finished checkpoint, failing at each step. Before the new
    manifest commits, the old checkpoint is whole (the new run is refused as before, with its
    message); from then on the new run resumes by itself: the old files go only after the commit."""
    reference = pruned(None)

    def old_run(ck):
        prune_model(tiny_model("llama", seed=5, layers=BLOCKS), TOKENS, WandaPruner(WandaConfig(sparsity=0.3)),
                    LayerEngine(progress=False), checkpoint_dir=ck)

    old_run(tmp_path / "clean")
    steps = recorded_steps(tmp_path / "clean", lambda: pruned(tmp_path / "clean", resume=False))
    # the start over itself: the steps before the new run writes its first block
    steps = steps[:next(i for i, s in enumerate(steps) if s.startswith("write block-"))]
    assert len(steps) == 2 + BLOCKS, steps  # the new manifest, then the old run's blocks
    for i in range(len(steps)):
        ck = tmp_path / f"ck{i}"
        old_run(ck)
        with FaultFS(ck, fail_at=i):
            with pytest.raises(Exception) as err:
                pruned(ck, resume=False)
        assert injected(err.value), err.value
        try:
            got = pruned(ck)
        except ConfigError as exc:
            assert i < 2 and "belongs to another run" in str(exc), (steps[i], exc)
            got = pruned(ck, resume=False)
        assert same(got, reference), steps[i]
    assert steps[:2] == ["write manifest.json.tmp", "replace manifest.json.tmp"], steps


def test_removing_a_checkpoint_can_fail_at_any_step(tmp_path):
    reference = pruned(None)
    pruned(tmp_path / "clean")
    steps = recorded_steps(tmp_path / "clean", lambda: remove_checkpoint(tmp_path / "clean"))
    assert steps[0] == f"unlink {MANIFEST}", "the manifest goes first"
    for i in range(len(steps)):
        ck = tmp_path / f"ck{i}"
        pruned(ck)
        with FaultFS(ck, fail_at=i):
            remove_checkpoint(ck)  # best effort: never raises
        assert same(pruned(ck), reference), steps[i]


def test_an_unreadable_manifest_is_a_clear_config_error(tmp_path):
    ck = tmp_path / "ck"
    pruned(ck)
    manifest = ck / MANIFEST
    for text in ('{"version": 1, "fingerp', json.dumps({"version": 1}), "[]"):
        manifest.write_text(text)
        with pytest.raises(ConfigError) as err:
            Checkpoint(ck, {}).start(BLOCKS)
        assert str(err.value).startswith(f"checkpoint manifest {manifest} cannot be read (")
        assert str(err.value).endswith("); pass --no_resume to start fresh")
    assert same(pruned(ck, resume=False), pruned(None))


def test_a_manifest_pointing_at_a_missing_block_file_is_refused(tmp_path):
    ck = tmp_path / "ck"
    pruned(ck)
    (ck / "block-00001.safetensors").unlink()
    model = tiny_model("llama", seed=3, layers=BLOCKS)
    fp = json.loads((ck / MANIFEST).read_text())["fingerprint"]
    with pytest.raises(ConfigError) as err:
        Checkpoint(ck, fp).start(BLOCKS)
    assert str(err.value) == (f"checkpoint {ck} is incomplete (no state of block 1); pass --no_resume to start fresh")
    del model


def test_stale_files_outside_the_manifest_are_dropped_on_resume(tmp_path):
    ck = tmp_path / "ck"
    pruned(ck)
    for name in ("block-00007.safetensors", "inputs-00001.safetensors", "inputs-00002.safetensors.tmp",
                 "manifest.json.tmp"):
        (ck / name).write_bytes(b"stale")
    (ck / "notes.txt").write_text("not ours")
    pruned(ck)
    assert sorted(p.name for p in ck.iterdir()) == [f"block-{b:05d}.safetensors" for b in range(BLOCKS)] + [
        MANIFEST, "notes.txt"]


# --- the atomic save ----------------------------------------------------------------------------------


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
