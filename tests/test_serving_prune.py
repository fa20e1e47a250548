"""`prune` quantizes like `run` (so `--save_format compressed-tensors` is the int4 folder), refuses a
dense compressed-tensors folder before loading anything; `sweep --set` overrides every point."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from wanda_pipeline.cli import main
from wanda_pipeline.errors import ConfigError, PluginError

TINY = ["--prune_method", "magnitude", "--sparsity_type", "2:4", "--eval-windows", "0"]


def _prune(tiny_dir, out, *flags):
    return main(["prune", "--model", str(tiny_dir), *TINY, "--save_model", str(out), *flags])


@pytest.mark.parametrize("bits,group,extra,zero_points", [
    (4, 32, [], False),                                            # the int4 serving folder
    (8, 16, ["--quantizer_option", "symmetric=false"], True),      # any option of the plugin's Config
])
def test_prune_quantizes_into_a_pack_quantized_folder(tmp_path, tiny_dir, bits, group, extra, zero_points):
    out = tmp_path / "m"
    assert _prune(tiny_dir, out, "--save_format", "compressed-tensors", "--quantizer", "rtn",
                  "--bits", str(bits), "--group_size", str(group), *extra) == 0
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (quant["format"], weights["num_bits"], weights["group_size"]) == ("pack-quantized", bits, group)
    assert weights["symmetric"] is not zero_points
    stored = load_file(out / "model.safetensors")
    packed = stored["model.layers.0.mlp.up_proj.weight_packed"]
    # independent check of the packing: 32 // bits codes per int32 word along the input dimension
    assert packed.dtype == torch.int32 and packed.shape == (64, 32 * bits // 32)
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in stored) is zero_points
    from transformers import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    w = model.model.layers[0].mlp.up_proj.weight
    assert float((w == 0).float().mean()) >= 0.5  # the 2:4 zeros survived quantization
    assert (w.reshape(w.shape[0], -1, 4) == 0).sum(-1).min() >= 2


def test_prune_without_quantizer_refuses_compressed_tensors_before_loading(tmp_path, tiny_dir, capsys):
    out = tmp_path / "m"
    assert _prune(tiny_dir, out, "--save_format", "compressed-tensors") == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "needs a quantizer" in err and "--quantizer rtn --bits 4" in err and "--save_format hf" in err
    assert "[stage]" not in err and not out.exists()  # nothing ran, nothing written
    assert _prune(tiny_dir, out, "--bits", "4") == ConfigError.exit_code
    assert "--bits set without --quantizer" in capsys.readouterr().err
    assert _prune(tiny_dir, out, "--quantizer", "rtn", "--quantizer_option", "symmetric") == ConfigError.exit_code
    # names come from the plugin registry, and each plugin's Config checks its own options
    assert _prune(tiny_dir, out, "--quantizer", "nope") == PluginError.exit_code
    assert "unknown quantizer 'nope'" in capsys.readouterr().err
    assert _prune(tiny_dir, out, "--quantizer", "rtn", "--bits", "3") == ConfigError.exit_code
    assert not out.exists()


def test_prune_hf_with_quantizer_writes_dequantized_weights(tmp_path, tiny_dir):
    out = tmp_path / "m"
    assert _prune(tiny_dir, out, "--quantizer", "rtn", "--bits", "4", "--group_size", "32") == 0
    w = load_file(out / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    for row in w.reshape(-1, 32):  # independent check: at most 16 levels per group of 32
        assert len(set(row.tolist())) <= 16
