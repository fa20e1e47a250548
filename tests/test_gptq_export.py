"""A GPTQ-quantized pruned model exports through the unchanged compressed-tensors path:
compressed-tensors' own dequantizer gives the in-memory weights bit for bit, and transformers'
from_pretrained gives the same weights and logits. The run path quantizes inside the prune
stage (calibrating even for a pruner that needs no data) and reports it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_export_compressed import CONFIG, block_linears
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig

from tests.conftest import needs_data, quick_spec
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.export import save
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.quantizers.gptq import GPTQConfig, GPTQQuantizer


def gptq_llama(pattern: str, config: GPTQConfig, dtype=torch.float32, passes: int = 2):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).to(dtype).eval()
    tokens = torch.randint(0, CONFIG["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))
    quantizer = GPTQQuantizer(config)
    pruner = WandaPruner(WandaConfig(pattern=pattern) if pattern != "unstructured" else WandaConfig(sparsity=0.5))
    prune_model(model, tokens, pruner, LayerEngine(progress=False, passes=passes), quantizer=quantizer)
    return model, quantizer


CASES = [  # bits, symmetric, group_size, act_order, dtype, passes
    (4, True, 16, False, torch.float32, 2), (4, False, 32, False, torch.float32, 2),
    (8, True, 32, False, torch.float32, 1), (8, False, 16, True, torch.float32, 2),
    (4, True, 128, False, torch.float32, 2),  # per row: the channel strategy
    (4, True, 32, True, torch.bfloat16, 2), (4, False, 16, False, torch.bfloat16, 1),
]


@pytest.mark.parametrize("bits,symmetric,group_size,act_order,dtype,passes", CASES)
def test_gptq_exports_and_loads_bit_identically(bits, symmetric, group_size, act_order, dtype, passes, tmp_path):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    config = GPTQConfig(bits=bits, symmetric=symmetric, group_size=group_size, act_order=act_order)
    model, quantizer = gptq_llama("2:4", config, dtype, passes)
    out = save(model, None, tmp_path / "m", "compressed-tensors", {}, quantizer=quantizer, pattern="2:4")
    tensors = load_file(str(out / "model.safetensors"))
    assert sum(k.endswith(".weight_packed") for k in tensors) == 14
    dequant = CompressedTensorsDequantizer(out, dtype=dtype).validate(tensors)
    for name, lin in block_linears(model).items():
        assert torch.equal(dequant[f"{name}.weight"], lin.weight), name
        groups = lin.weight.detach().float().reshape(lin.weight.shape[0], -1, 4)
        assert bool(((groups == 0).sum(-1) >= 2).all()), f"{name}: the 2:4 pattern was lost"
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    expected_group = None if group_size >= 128 else group_size
    assert (weights["weights"]["num_bits"], weights["weights"]["symmetric"], weights["weights"]["group_size"]) == \
        (bits, symmetric, expected_group)

    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    for name, lin in block_linears(loaded).items():
        assert torch.equal(lin.weight, block_linears(model)[name].weight), name
    with torch.no_grad():
        got, expected = loaded(ids).logits.float(), model(ids).logits.float()
    if dtype == torch.float32:
        assert torch.equal(got, expected), "float32 logits must be identical"
    else:  # the reference's rotary buffers were cast to bf16 by .to(); the loader keeps them float32
        torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)


@needs_data
def test_the_run_path_quantizes_inside_the_prune_stage(tmp_path, tiny_dir):
    """magnitude needs no calibration, gptq does: the run calibrates, quantizes while pruning,
    reports it, and saves a compressed-tensors folder that reloads to the evaluated weights."""
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.models import state_digest
    from wanda_pipeline.run import execute

    spec = PipelineSpec.model_validate(quick_spec(
        str(tiny_dir), pruner={"name": "magnitude", "sparsity": 0.5},
        quantizer={"name": "gptq", "bits": 4, "group_size": 16}, evaluators=[{"name": "sparsity"}],
        dense_baseline=False, register={"enabled": False},
        save={"path": str(tmp_path / "saved"), "format": "compressed-tensors"}))
    result = execute(spec, pipeline="tiny-gptq", progress=False)
    assert "calibrate" in result.seconds and result.seconds["quantize"] < result.seconds["prune"]
    m = result.metrics
    assert m["quant_bits_per_weight"] == pytest.approx(4 + 16 / 16) and m["quant_seconds"] > 0
    assert m["counter_quantizer_linears"] == 14 and result.params["quantizer"]["name"] == "gptq"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved",
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    assert state_digest(loaded) == result.weights_digest
    weights = [lin.weight for lin in block_linears(loaded).values()]
    assert m["quant_zeros_kept"] == sum(int((w == 0).sum()) for w in weights) >= sum(w.numel() for w in weights) // 2


def test_the_shipped_serve_pipeline_quantizes_with_gptq_and_exports_for_vllm():
    from wanda_pipeline.pipelines_file import load_file, pipeline_spec

    spec = pipeline_spec(load_file("pipelines.yaml"), "smollm2-wanda-gptq4-serve")
    assert spec.quantizer.name == "gptq" and spec.quantizer.options()["bits"] == 4
    group = spec.quantizer.options()["group_size"]
    assert 576 % group == 0 and 1536 % group == 0, "SmolLM2's linears must hold whole groups to export"
    assert spec.registration.folder_format == "compressed-tensors"
    gates = spec.registration.gates
    assert gates.max_ppl_ratio and gates.min_sparsity and gates.beat_champion == "ppl_wikitext2"


@pytest.mark.slow
@needs_data
@pytest.mark.usefixtures("prefect_harness")
def test_a_gptq_champion_is_a_compressed_tensors_folder(tmp_path, tiny_dir):
    """The serve pipeline's shape through the Prefect flow: prune, GPTQ in the same loop,
    evaluate, export compressed-tensors, register and promote behind the gates."""
    import mlflow

    from wanda_pipeline.models import state_digest
    from wanda_pipeline.orchestration.compress import compress
    from wanda_pipeline.tracking.model_logging import model_folders

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = quick_spec(str(tiny_dir), uri, quantizer={"name": "gptq", "bits": 4, "group_size": 16},
                      evaluators=[{"name": "perplexity", "seqlen": 32, "windows": 8}, {"name": "sparsity"}],
                      register={"format": "compressed-tensors",
                                "gates": {"max_ppl_ratio": 100.0, "min_sparsity": 0.49}})
    summary = compress("tiny-gptq", spec)
    assert summary["stages"] == ["preflight", "load", "preflight-export", "calibrate", "evaluate-dense", "prune",
                                 "quantize", "evaluate", "register"]
    assert summary["registration"]["promoted"] and summary["metrics"]["counter_quantizer_linears"] == 14
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny-gptq@champion", dst_path=str(tmp_path / "c"))
    folder, _ = model_folders(local)  # the transformers flavour's model/ (symmetric int4)
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "pack-quantized" and quant["config_groups"]["group_0"]["weights"]["group_size"] == 16
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert state_digest(loaded) == summary["weights_digest"]
