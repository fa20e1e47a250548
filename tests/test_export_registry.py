"""The run path writes and registers compressed-tensors folders: the champion alias points at a
folder transformers (and vLLM) load, bit-identical to the model the run evaluated."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from tests.conftest import needs_data, quick_spec
from wanda_pipeline.cli import main
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.models import state_digest
from wanda_pipeline.tracking.model_logging import model_folders


@pytest.mark.slow
@needs_data
@pytest.mark.usefixtures("prefect_harness")
def test_champion_is_a_compressed_tensors_folder(tmp_path, tiny_dir):
    import mlflow
    import mlflow.pyfunc

    from wanda_pipeline.orchestration.compress import compress

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = quick_spec(str(tiny_dir), uri, quantizer={"name": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
                      evaluators=[{"name": "sparsity"}, {"name": "latency", "prompt_tokens": 8, "decode_tokens": 2,
                                                         "warmup": 0, "repeats": 1}],
                      register={"format": "compressed-tensors", "gates": {}},
                      save={"path": str(tmp_path / "saved"), "format": "compressed-tensors"})
    summary = compress("tiny-ct", spec)
    assert summary["registration"]["promoted"]
    assert summary["metrics"]["latency_prefill_ms_vs_dense"] > 0  # timed dense and pruned in this run

    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny-ct@champion",
                                                     dst_path=str(tmp_path / "champion")))
    # asymmetric int4: this package's pyfunc, the export folder as its data (symmetric ones: the
    # transformers flavour's model/, tests/test_serving_mlflow.py)
    ckpt, _ = model_folders(local)
    assert (local / "MLmodel").exists() and (ckpt / "config.json").exists()
    for folder in (ckpt, tmp_path / "saved"):
        quant = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert quant["format"] == "pack-quantized" and quant["config_groups"]["group_0"]["weights"]["num_bits"] == 4
        dequantize = CompressedTensorsConfig(dequantize=True)
        loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=dequantize)
        assert state_digest(loaded) == summary["weights_digest"]
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-ct@champion")
    assert isinstance(pyfunc.predict(["Hello"], params={"max_new_tokens": 2})[0], str)


@pytest.mark.slow
def test_prune_cli_writes_compressed_tensors(tmp_path, tiny_dir):
    out = tmp_path / "m"
    args = ["prune", "--model", str(tiny_dir), "--prune_method", "magnitude", "--sparsity_type", "2:4",
            "--eval-windows", "0", "--save_model", str(out), "--quantizer", "rtn", "--bits", "8", "--group_size",
            "32", "--save_format", "compressed-tensors"]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["wanda_sparsity"]["sparsity_structure"] == "2:4" and cfg["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
    assert main([*args[:-1], "gguf"]) == ConfigError.exit_code


def test_save_accepts_a_path_or_a_mapping():
    from wanda_pipeline.config import PipelineSpec

    base = {"model": {"source": "x"}, "pruner": {"name": "wanda"}}
    assert PipelineSpec(**base, save="out").save.format == "hf"
    spec = PipelineSpec(**base, save={"path": "out", "format": "compressed-tensors"},
                        register={"format": "compressed-tensors"})
    assert (spec.save.path, spec.save.format, spec.registration.format) == ("out", "compressed-tensors",
                                                                              "compressed-tensors")
    with pytest.raises(ValueError, match="format"):
        PipelineSpec(**base, save={"path": "out", "format": "onnx"})
    assert PipelineSpec(**PipelineSpec(**base, save="out").model_dump(by_alias=True)).save.path == "out"
