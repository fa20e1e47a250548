"""Checkpoint files and their resume semantics, on the files themselves (no engine run):
bit-packed masks, the manifest, the boundary inputs kept and dropped, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wanda_pipeline.engine.checkpoint import Checkpoint, pack_bits, unpack_bits
from wanda_pipeline.engine.sink import atomic_save
from wanda_pipeline.errors import ConfigError, DataError

FP = {"model": "abc", "pruner": {"sparsity": 0.5}, "batch": 2}


@pytest.mark.parametrize("shape", [(8,), (3, 5), (4, 3), (2, 3, 7), (1,)])
def test_pack_bits_is_little_endian_bytes_and_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) > 0.5
    packed = pack_bits(mask)
    flat = [int(b) for b in mask.reshape(-1)] + [0] * (-mask.numel() % 8)
    want = [sum(bit << i for i, bit in enumerate(flat[j:j + 8])) for j in range(0, len(flat), 8)]
    assert packed.dtype == torch.uint8 and packed.tolist() == want  # one byte per 8 entries, bit i = entry i
    back = unpack_bits(packed, shape)
    assert back.dtype == torch.bool and back.shape == shape and torch.equal(back, mask)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_fresh_start_creates_nested_folder_and_commits_block_zero(tmp_path):
    folder = tmp_path / "a" / "b" / "ck"
    assert Checkpoint(folder, FP).start(3) == 0
    assert _manifest(folder) == {"version": 1, "fingerprint": FP, "n_blocks": 3, "finished": 0}
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]  # no temporary left behind
    # resuming is the default: the same run finds the fresh checkpoint and starts at block 0
    assert Checkpoint(folder, FP).start(3) == 0


def test_save_keeps_only_the_next_blocks_inputs_and_resumes_there(tmp_path):
    ck = Checkpoint(tmp_path, FP)
    ck.start(3)
    outs = [torch.randn(2, 4, 6), torch.randn(1, 4, 6)]
    mask = torch.rand(5, 3) > 0.5
    weight = torch.randn(5, 3, dtype=torch.float16)
    ck.save(0, {"q.mask": mask, "w.weight": weight}, outs)
    assert (tmp_path / "inputs-00001.safetensors").exists()
    assert _manifest(tmp_path)["finished"] == 1
    state = ck.block_state(0)
    assert torch.equal(state["q.mask"], mask) and state["q.mask"].dtype == torch.bool
    assert torch.equal(state["w.weight"], weight) and state["w.weight"].dtype == torch.float16

    again = Checkpoint(tmp_path, FP)
    assert again.start(3) == 1
    got = again.inputs(1)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, outs, strict=True))

    again.save(1, {"q.mask": mask}, [o + 1 for o in outs])  # inputs of block 2 are the last ones kept
    assert (tmp_path / "inputs-00002.safetensors").exists()
    assert not (tmp_path / "inputs-00001.safetensors").exists()
    again.save(2, {"q.mask": mask}, [o + 2 for o in outs])  # the last block has no successor
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "block-00000.safetensors", "block-00001.safetensors", "block-00002.safetensors", "manifest.json"]
    assert Checkpoint(tmp_path, FP).start(3) == 3


def test_block_file_without_mask_shapes_loads_as_plain_tensors(tmp_path):
    ck = Checkpoint(tmp_path, FP)
    ck.start(2)
    weight = torch.randn(4, 4)
    atomic_save({"w.weight": weight}, tmp_path / "block-00000.safetensors")
    assert torch.equal(ck.block_state(0)["w.weight"], weight)


def test_fingerprint_values_that_are_not_json_compare_as_text(tmp_path):
    fp = {"model": Path("/models/x"), "dtype": torch.float16}
    Checkpoint(tmp_path, fp).start(2)
    assert _manifest(tmp_path)["fingerprint"] == {"model": "/models/x", "dtype": "torch.float16"}
    assert Checkpoint(tmp_path, dict(fp)).start(2) == 0


@pytest.mark.parametrize("found, n_blocks, named", [
    ({**FP, "model": "other"}, 3, "model"),
    ({**FP, "batch": 4, "pruner": {"sparsity": 0.6}}, 3, "batch, pruner"),
    ({k: v for k, v in FP.items() if k != "batch"}, 3, "batch"),      # a key only this run has
    ({**FP, "extra": 1}, 3, "extra"),                                   # a key only the old run had
    (FP, 4, "n_blocks"),
])
def test_another_runs_checkpoint_is_refused_naming_what_differs(tmp_path, found, n_blocks, named):
    Checkpoint(tmp_path, found).start(n_blocks)
    with pytest.raises(ConfigError) as err:
        Checkpoint(tmp_path, FP).start(3)
    assert str(err.value) == (f"checkpoint {tmp_path} belongs to another run (differs in: {named}); "
                              "pass --no_resume to start fresh there, or choose another --checkpoint_dir")


def test_a_manifest_without_fingerprint_is_refused_as_another_runs(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "n_blocks": 3, "finished": 1}))
    with pytest.raises(ConfigError, match=r"belongs to another run \(differs in: batch, model, pruner\)"):
        Checkpoint(tmp_path, FP).start(3)


@pytest.mark.parametrize("manifest", [[1, 2], {"n_blocks": "3", "finished": 1, "fingerprint": {}},
                                      {"n_blocks": 3, "fingerprint": {}},
                                      {"n_blocks": 3, "finished": 1, "fingerprint": 7}])
def test_a_manifest_of_the_wrong_shape_is_refused_saying_what_it_needs(tmp_path, manifest):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        Checkpoint(tmp_path, FP).start(3)
    assert str(err.value) == (f"checkpoint {tmp_path / 'manifest.json'} is corrupt: not a checkpoint manifest "
                              "(needs the integers n_blocks and finished, and a fingerprint); pass --no_resume "
                              f"(engine.resume: false) to start fresh there, or remove {tmp_path}")


def test_no_resume_starts_over_in_the_same_folder(tmp_path):
    ck = Checkpoint(tmp_path, {"model": "old"})
    ck.start(2)
    ck.save(0, {"m": torch.ones(3, dtype=torch.bool)}, [torch.zeros(1, 2)])
    assert Checkpoint(tmp_path, FP, resume=False).start(3) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert _manifest(tmp_path)["fingerprint"] == FP


def test_checkpoint_without_the_next_inputs_is_incomplete(tmp_path):
    ck = Checkpoint(tmp_path, FP)
    ck.start(3)
    ck.save(0, {}, [torch.zeros(1, 2)])
    (tmp_path / "inputs-00001.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        Checkpoint(tmp_path, FP).start(3)
    assert str(err.value) == (f"checkpoint {tmp_path} is incomplete (no inputs of block 1); "
                              "pass --no_resume to start fresh")


def test_a_non_empty_folder_that_is_no_checkpoint_is_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for resume in (True, False):
        with pytest.raises(ConfigError) as err:
            Checkpoint(tmp_path, FP, resume=resume).start(2)
        assert str(err.value) == (f"--checkpoint_dir {tmp_path} is not empty and holds no checkpoint; "
                                  "choose an empty or new folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_remove_deletes_the_folder_and_tolerates_its_absence(tmp_path):
    ck = Checkpoint(tmp_path / "ck", FP)
    ck.start(2)
    ck.save(0, {}, [torch.zeros(1, 2)])
    ck.remove()
    assert not (tmp_path / "ck").exists()
    ck.remove()  # already gone: no error
    assert list(tmp_path.iterdir()) == []
