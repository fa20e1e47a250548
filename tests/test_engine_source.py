"""ShardSource on tiny models saved here: which tensors a block, the outer modules and their
buffers get, ties kept, dtypes converted, renamed checkpoints, the refusals, the fingerprint."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine_architectures import LLAMA_LIKE

from wanda_pipeline.engine.skeleton import build_skeleton
from wanda_pipeline.engine.source import ShardSource, iter_blocks, read_tensor
from wanda_pipeline.errors import ConfigError, DataError
from wanda_pipeline.models import find_blocks


def _llama(seed=0, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", **dict(LLAMA_LIKE, num_hidden_layers=3, tie_word_embeddings=True, **over))
    return AutoModelForCausalLM.from_config(cfg).eval()


def _saved(tmp_path, model, name="src", **kw):
    model.save_pretrained(tmp_path / name, **kw)
    return tmp_path / name, {k: v.clone() for k, v in model.state_dict().items()}


def _live(blocks):
    return [i for i, b in enumerate(blocks) if not any(p.is_meta for p in b.parameters())]


def test_iter_blocks_streams_each_block_then_releases_it(tmp_path):
    folder, want = _saved(tmp_path, _llama(1), max_shard_size="60KB")
    skeleton = build_skeleton(folder, torch.float32)
    ShardSource(skeleton, folder)  # marks the skeleton as streamed from folder
    path, blocks = find_blocks(skeleton)
    seen = []
    for i, block in iter_blocks(skeleton):
        seen.append(i)
        assert block is blocks[i] and _live(blocks) == [i]
        for k, v in block.state_dict().items():
            assert torch.equal(v, want[f"{path}.{i}.{k}"]), k
    assert seen == [0, 1, 2] and _live(blocks) == []

    memory = _llama(1)
    assert [(i, b) for i, b in iter_blocks(memory)] == list(enumerate(find_blocks(memory)[1]))


def test_outer_parameters_load_on_cpu_with_the_tie_kept_and_blocks_left_on_meta(tmp_path):
    folder, want = _saved(tmp_path, _llama(2))
    skeleton = build_skeleton(folder, torch.float32)
    source = ShardSource(skeleton, folder)
    assert source.prepare_outer() == torch.device("cpu")
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert torch.equal(skeleton.model.embed_tokens.weight, want["model.embed_tokens.weight"])
    assert torch.equal(skeleton.model.norm.weight, want["model.norm.weight"])
    assert _live(source.blocks) == []
    block = source.load(1, torch.device("cpu"))
    assert _live(source.blocks) == [1]
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in block.parameters())


def test_a_tied_parameter_absent_under_its_own_name_is_read_under_its_alias(tmp_path):
    folder, want = _saved(tmp_path, _llama(3))
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    skeleton = build_skeleton(folder, torch.float32)
    source = ShardSource(skeleton, folder)
    source.materialise("lm_head.", skeleton.lm_head, torch.device("cpu"))  # the head before the embeddings
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert torch.equal(skeleton.lm_head.weight, want["model.embed_tokens.weight"])


def test_parameters_already_real_are_kept_and_the_rest_read(tmp_path):
    folder, want = _saved(tmp_path, _llama(4))
    skeleton = build_skeleton(folder, torch.float32)
    source = ShardSource(skeleton, folder)
    block = source.blocks[0]
    first_name, first = next(iter(block.named_parameters()))
    mine = torch.nn.Parameter(torch.zeros(first.shape), requires_grad=False)
    owner, _, leaf = first_name.rpartition(".")
    block.get_submodule(owner)._parameters[leaf] = mine
    source.load(0, torch.device("cpu"))
    for name, p in block.named_parameters():
        if name == first_name:
            assert p is mine
        else:
            assert torch.equal(p, want[f"model.layers.0.{name}"]), name


def test_checkpoint_dtype_is_converted_to_the_skeletons(tmp_path):
    folder, want = _saved(tmp_path, _llama(5).to(torch.float16))
    skeleton = build_skeleton(folder, torch.float32)
    source = ShardSource(skeleton, folder)
    block = source.load(2, torch.device("cpu"))
    assert block.self_attn.q_proj.weight.dtype == torch.float32
    assert torch.equal(block.self_attn.q_proj.weight, want["model.layers.2.self_attn.q_proj.weight"].float())


def test_persistent_buffers_in_the_shards_are_read_and_computed_ones_kept(tmp_path):
    model = _llama(6)
    scale, gain = torch.randn(32), torch.randn(32)
    model.model.layers[1].mlp.register_buffer("scale", scale)
    model.model.norm.register_buffer("gain", gain)
    model.model.layers[1].register_buffer("table", torch.ones(4))  # saved, but the skeleton computes it
    offset = torch.randn(32)
    model.model.offset = torch.nn.Parameter(offset.clone())  # a module owning a parameter and children
    folder, _ = _saved(tmp_path, model)
    skeleton = build_skeleton(folder, torch.float32)
    skeleton.model.layers[1].mlp.register_buffer("scale", torch.empty(32, device="meta"))
    skeleton.model.norm.register_buffer("gain", torch.empty(32, device="meta"))
    skeleton.model.layers[1].register_buffer("table", torch.zeros(4))
    skeleton.model.offset = torch.nn.Parameter(torch.empty(32, device="meta"))
    source = ShardSource(skeleton, folder)
    source.prepare_outer()
    assert torch.equal(skeleton.model.norm.gain, gain) and torch.equal(skeleton.model.offset, offset)
    assert _live(source.blocks) == [] and skeleton.model.layers[1].mlp.scale.is_meta  # blocks wait for load
    block = source.load(1, torch.device("cpu"))
    assert torch.equal(block.mlp.scale, scale)
    assert torch.equal(block.table, torch.zeros(4))


def test_a_base_model_checkpoint_without_the_prefix_streams_into_the_lm(tmp_path):
    model = _llama(7)
    folder, want = _saved(tmp_path, model.model)  # keys "layers.0...", no "model."
    assert "layers.0.mlp.up_proj.weight" in load_file(str(folder / "model.safetensors"))
    skeleton = build_skeleton(folder, torch.float32)
    source = ShardSource(skeleton, folder)
    source.prepare_outer()
    block = source.load(0, torch.device("cpu"))
    assert torch.equal(block.mlp.up_proj.weight, want["layers.0.mlp.up_proj.weight"])
    assert torch.equal(skeleton.lm_head.weight, want["embed_tokens.weight"])


def test_tensors_merged_on_load_are_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                               num_experts_per_tok=1, vocab_size=64, max_position_embeddings=64)
    folder, _ = _saved(tmp_path, AutoModelForCausalLM.from_config(cfg))
    with pytest.raises(ConfigError, match=r"^MixtralForCausalLM: checkpoint tensor 'model\.layers\.0\.block_sparse_moe"
                                          r"\.experts\.0\.w1\.weight' is merged or split on load .*drop --stream$"):
        ShardSource(build_skeleton(folder, torch.float32), folder)


def test_missing_weights_and_missing_tensors_are_data_errors(tmp_path):
    model = _llama(8)
    folder, want = _saved(tmp_path, model)
    skeleton = build_skeleton(folder, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no model.safetensors.*streaming needs safetensors weights"):
        ShardSource(skeleton, tmp_path / "empty")
    del want["model.layers.0.self_attn.k_proj.weight"], want["lm_head.weight"]
    save_file(want, str(folder / "model.safetensors"), {"format": "pt"})
    source = ShardSource(build_skeleton(folder, torch.float32), folder)
    with pytest.raises(DataError, match=r"no tensor for 'model\.layers\.0\.self_attn\.k_proj\.weight' in the"):
        source.load(0, torch.device("cpu"))


def test_a_truncated_shard_is_a_data_error(tmp_path):
    save_file({"a": torch.randn(4), "b": torch.randn(64)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-10])
    assert read_tensor(tmp_path / "x.safetensors", "a", {}).shape == (4,)
    with pytest.raises(DataError, match="x.safetensors is truncated at tensor 'b'"):
        read_tensor(tmp_path / "x.safetensors", "b", {})


def _digest(folder) -> str:
    """sha256 of config.json, then per shard (sorted) its header and its size in bytes."""
    config = folder / "config.json"
    h = hashlib.sha256(config.read_bytes() if config.exists() else b"")
    for shard in sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())):
        raw = (folder / shard).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        h.update(raw[8:8 + n])
        h.update(str(len(raw)).encode())
    return h.hexdigest()[:16]


def test_fingerprint_covers_config_headers_and_sizes_not_weight_bytes(tmp_path):
    folder, _ = _saved(tmp_path, _llama(9), max_shard_size="60KB")
    skeleton = build_skeleton(folder, torch.float32)
    first = ShardSource(skeleton, folder).fingerprint()
    assert first == _digest(folder)
    shard = folder / "model-00001-of-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-4:] = bytes(4 - i for i in range(4))  # other weight bytes, same header and size
    shard.write_bytes(bytes(raw))
    assert ShardSource(skeleton, folder).fingerprint() == first
    shard.write_bytes(bytes(raw) + b"\0" * 8)  # size differs
    assert ShardSource(skeleton, folder).fingerprint() not in (first,)
    assert ShardSource(skeleton, folder).fingerprint() == _digest(folder)
    (folder / "config.json").rename(folder / "moved.json")
    assert ShardSource(skeleton, folder).fingerprint() == _digest(folder)
