"""Streaming's model skeleton: which folders qualify (local, or a hub snapshot of config,
weights and tokenizer only), the errors otherwise, and the skeleton itself (meta parameters in
the asked dtype, real buffers, no cache)."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch

from wanda_pipeline.engine.skeleton import build_skeleton, safetensors_folder
from wanda_pipeline.errors import ConfigError, DataError


def test_a_local_folder_needs_safetensors_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        safetensors_folder(str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "has no safetensors weights" in msg
    assert "--stream" in msg and msg.endswith("streaming needs them: drop --stream / engine.stream, or convert the "
                                              "model to safetensors first")


@pytest.mark.parametrize("weights", ["model.safetensors", "model.safetensors.index.json"])
def test_a_local_folder_with_one_file_or_an_index_is_used_as_is(tmp_path, weights):
    (tmp_path / weights).write_text("{}")
    assert safetensors_folder(str(tmp_path)) == tmp_path


def test_a_user_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_text("")
    assert safetensors_folder("~/m") == tmp_path / "m"


class FakeHub:
    """snapshot_download over a 'remote' folder: copies the files the patterns allow."""

    def __init__(self, remote: Path, dest: Path):
        self.remote, self.dest, self.calls = remote, dest, []

    def __call__(self, repo_id, revision=None, allow_patterns=None):
        self.calls.append((repo_id, revision))
        self.dest.mkdir(exist_ok=True)
        for f in self.remote.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatchcase(f.name, p) for p in allow_patterns):
                shutil.copy(f, self.dest / f.name)
        return str(self.dest)


REMOTE = ["config.json", "model.safetensors", "tokenizer.model", "merges.txt", "pytorch_model.bin", "flax.msgpack"]


def test_a_hub_id_is_fetched_as_config_weights_and_tokenizer_only(tmp_path, monkeypatch):
    import huggingface_hub

    remote = tmp_path / "remote"
    remote.mkdir()
    for name in REMOTE:
        (remote / name).write_text("x")
    hub = FakeHub(remote, tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    folder = safetensors_folder("org/not-a-local-path", revision="abc123")
    assert folder == tmp_path / "snap" and hub.calls == [("org/not-a-local-path", "abc123")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(REMOTE[:4])


def test_a_hub_snapshot_without_safetensors_is_refused(tmp_path, monkeypatch):
    import huggingface_hub

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text("{}")
    (remote / "pytorch_model.bin").write_text("x")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(remote, tmp_path / "snap"))
    with pytest.raises(ConfigError, match="has no safetensors weights"):
        safetensors_folder("org/bin-only")


def test_a_failed_download_is_a_data_error_naming_the_model(monkeypatch):
    import huggingface_hub

    def offline(*_a, **_k):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError) as err:
        safetensors_folder("org/missing-model")
    assert "'org/missing-model'" in str(err.value) and "no connection" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)


def test_the_skeleton_has_meta_parameters_in_the_asked_dtype_and_no_cache(tmp_path):
    from wanda_pipeline.tiny_models import tiny_model

    tiny_model("llama", layers=2).config.save_pretrained(tmp_path)
    model = build_skeleton(tmp_path, torch.bfloat16)
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    assert all(b.device.type == "cpu" for b in model.buffers())  # rotary tables are computed
    assert model.config.use_cache is False and not model.training
    assert model.lm_head.weight.shape == (128, 32)


CUSTOM_CONFIG = '''
from transformers import LlamaConfig
class ToyConfig(LlamaConfig):
    model_type = "toy-remote"
'''
CUSTOM_MODEL = '''
from transformers import LlamaForCausalLM
from .configuration_toy import ToyConfig
class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig
'''


def test_custom_code_loads_only_when_trusted(tmp_path):
    import json

    from wanda_pipeline.tiny_models import tiny_model

    cfg = tiny_model("llama", layers=1).config.to_dict()
    cfg.update(model_type="toy-remote", auto_map={"AutoConfig": "configuration_toy.ToyConfig",
                                                  "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "configuration_toy.py").write_text(CUSTOM_CONFIG)
    (tmp_path / "modeling_toy.py").write_text(CUSTOM_MODEL)
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_skeleton(tmp_path, torch.float16)  # not trusted by default
    model = build_skeleton(tmp_path, torch.float16, trust_remote_code=True)
    assert type(model).__name__ == "ToyForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.float16}
