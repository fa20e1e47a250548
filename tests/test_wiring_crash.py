"""Crash consistency of the checkpoint commit, by fault injection (tests/fault_fs.py): every
filesystem step of a checkpointed run (and of a restart and a removal) fails in turn. Two states
follow each fault: the folder after the raised error, and a copy taken just before the step (what a
``kill -9`` there leaves). From both, the next run resumes to the uninterrupted result or is refused
with a clear message: never a checkpoint that cannot resume. (Saves and exports:
test_wiring_crash_save.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fault_fs import FaultFS, fail_at, injected, recorded_steps
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.engine.checkpoint import MANIFEST, Checkpoint, remove_checkpoint
from wanda_pipeline.errors import ConfigError, DataError
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.tiny_models import tiny_model

BLOCKS = 3
TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


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


def test_removing_a_half_removed_checkpoint_removes_the_rest(tmp_path):
    ck = tmp_path / "ck"
    pruned(ck)
    (ck / MANIFEST).unlink()  # what a removal stopped after its first step leaves
    remove_checkpoint(ck)
    assert not ck.exists()


def test_an_unreadable_manifest_is_a_clear_data_error(tmp_path):
    ck = tmp_path / "ck"
    pruned(ck)
    manifest = ck / MANIFEST
    for text in ('{"version": 1, "fingerp', json.dumps({"version": 1}), "[]"):
        manifest.write_text(text)
        with pytest.raises(DataError) as err:
            Checkpoint(ck, {}).start(BLOCKS)
        assert str(err.value).startswith(f"checkpoint {manifest} is corrupt: ")
        assert str(err.value).endswith(
            f"; pass --no_resume (engine.resume: false) to start fresh there, or remove {ck}")
    assert same(pruned(ck, resume=False), pruned(None))


def test_a_manifest_pointing_at_a_missing_block_file_is_refused(tmp_path):
    ck = tmp_path / "ck"
    pruned(ck)
    (ck / "block-00001.safetensors").unlink()
    model = tiny_model("llama", seed=3, layers=BLOCKS)
    fp = json.loads((ck / MANIFEST).read_text())["fingerprint"]
    with pytest.raises(DataError) as err:
        Checkpoint(ck, fp).start(BLOCKS)
    assert str(err.value) == (f"checkpoint {ck / MANIFEST} is corrupt: block-00001.safetensors, which it counts as "
                              f"written, is unusable: it is missing; pass --no_resume (engine.resume: false) to start "
                              f"fresh there, or remove {ck}")
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
