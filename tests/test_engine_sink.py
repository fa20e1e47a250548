"""Shards written by the sink: readable by safetensors, 8-byte aligned data, the HF index
and metadata, blocks freed after writing, outer tensors copied byte for byte."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_engine_architectures import build

from wanda_pipeline.engine.sink import DTYPES, ModelSink, ShardSink, atomic_save, copy_raw, write_tensors
from wanda_pipeline.models import find_blocks


def _header_len(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _tensors(names):
    g = torch.Generator().manual_seed(len(names))
    return {n: torch.randn(3, len(n) % 4 + 1, generator=g) for n in names}


# header lengths of every residue mod 8, so unpadded or wrongly padded headers show
NAME_SETS = [["a"], ["ab"], ["abc"], ["w" * 5], ["w" * 6, "x"], ["w" * 7], ["q" * 9, "r" * 2], ["layer.0.w"]]


@pytest.mark.parametrize("names", NAME_SETS)
def test_written_files_load_and_start_their_data_8_byte_aligned(names, tmp_path):
    tensors = _tensors(names)
    write_tensors(tensors, tmp_path / "w.safetensors", {"k": "v"})
    assert (8 + _header_len(tmp_path / "w.safetensors")) % 8 == 0
    got = load_file(str(tmp_path / "w.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}

    save_file(tensors, str(tmp_path / "src.safetensors"))
    copy_raw(tmp_path, {n: "src.safetensors" for n in names}, names, tmp_path / "c.safetensors", chunk=5)
    assert (8 + _header_len(tmp_path / "c.safetensors")) % 8 == 0
    got = load_file(str(tmp_path / "c.safetensors"))
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_every_dtype_round_trips(dtype, tmp_path):
    t = (torch.arange(12) % 3).to(dtype).reshape(3, 4)
    atomic_save({"t": t}, tmp_path / "x.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    got = load_file(str(tmp_path / "x.safetensors"))["t"]
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))


def test_copy_raw_renames_only_the_keys_given_and_marks_pt(tmp_path):
    src = {"embed_out.weight": torch.randn(4, 3), "norm.weight": torch.randn(3), "a.b": torch.randn(2, 2)}
    save_file(src, str(tmp_path / "s1.safetensors"))
    save_file({"x": torch.arange(5)}, str(tmp_path / "s2.safetensors"))
    wmap = {"lm_head.weight": "s1.safetensors", "norm.weight": "s1.safetensors", "a.b": "s1.safetensors",
            "x": "s2.safetensors"}
    copy_raw(tmp_path, wmap, ["x", "lm_head.weight", "norm.weight"], tmp_path / "o.safetensors",
             keys={"lm_head.weight": "embed_out.weight"}, chunk=3)
    got = load_file(str(tmp_path / "o.safetensors"))
    assert set(got) == {"lm_head.weight", "norm.weight", "x"}
    assert torch.equal(got["lm_head.weight"], src["embed_out.weight"]) and torch.equal(got["x"], torch.arange(5))
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # loaders before transformers 5 refuse shards without it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors", "s1.safetensors", "s2.safetensors"]


def test_model_sink_keeps_the_block_in_the_model():
    model = build("llama")
    block = find_blocks(model)[1][1]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    ModelSink().put(1, block)
    assert all(p.device.type == "cpu" for p in block.parameters())
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())


def _sink_run(tmp_path, release):
    model = build("llama", seed=2)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    path, blocks = find_blocks(model)
    out = tmp_path / "deep" / "out"
    sink = ShardSink(out, path, release=release)
    ShardSink(out, path)  # the folder exists already: fine
    for i, block in enumerate(blocks):
        sink.put(i, block)
    source_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    sink.finish(model, src, source_map)
    return model, out, expected


def test_shard_sink_writes_blocks_frees_them_and_indexes_everything(tmp_path):
    model, out, expected = _sink_run(tmp_path, None)
    assert all(p.is_meta for p in find_blocks(model)[1].parameters()), "written blocks go back to meta"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-block-00000.safetensors", "model-block-00001.safetensors",
                     "model-block-00002.safetensors", "model-block-00003.safetensors", "model-outer.safetensors"]
    assert index["metadata"] == {"total_size": sum((out / f).stat().st_size for f in files)}
    assert list(index["weight_map"]) == sorted(expected)
    for f in files:
        with safe_open(str(out / f), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
        for k, v in load_file(str(out / f)).items():
            assert index["weight_map"][k] == f and torch.equal(v, expected[k]), k
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["config.json", *files, "model.safetensors.index.json"]


def test_shard_sink_hands_written_blocks_to_its_release(tmp_path):
    released = []
    model, out, _ = _sink_run(tmp_path, released.append)
    assert released == [0, 1, 2, 3]
    assert not any(p.is_meta for p in model.parameters()), "freeing is the release's job then"
