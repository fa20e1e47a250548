"""compressed-tensors export, checked with the real loaders: compressed-tensors' own
model-free dequantizer over the exported folder, and transformers' from_pretrained on CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig

from wanda_pipeline import stages
from wanda_pipeline.config import EngineSpec
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import ConfigError, RunError
from wanda_pipeline.export import save
from wanda_pipeline.export.compressed_tensors import preflight
from wanda_pipeline.models import find_blocks, find_linears
from wanda_pipeline.pruners.magnitude import MagnitudeConfig, MagnitudePruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.quantizers.rtn import RTNConfig, RTNQuantizer

# hidden 64 and intermediate 128: group sizes 16 and 32 divide every linear.
CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def pruned_llama(pattern: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).to(dtype).eval()
    pruner = MagnitudePruner(MagnitudeConfig(sparsity=0.5, pattern=pattern))
    prune_model(model, None, pruner, LayerEngine(progress=False))
    return model


def block_linears(model) -> dict:
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": lin for i, b in enumerate(blocks) for n, lin in find_linears(b).items()}


def simple_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """RTN of a float32 weight in compressed-tensors' convention, one group at a time."""
    out = torch.empty_like(w)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            g = w[r, c : c + group]
            if symmetric:
                s = g.abs().max() / qmax
                out[r, c : c + group] = torch.round(torch.clamp(g / s, qmin, qmax)) * s
            else:
                lo, hi = min(float(g.min()), 0.0), max(float(g.max()), 0.0)
                s = torch.tensor((hi - lo) / (qmax - qmin))
                zp = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
                q = torch.round(torch.clamp(g / s + zp, qmin, qmax))
                out[r, c : c + group] = (q - zp) * s
    return out


CASES = [(bits, sym, gs) for bits in (8, 4) for sym in (True, False) for gs in (16, 32)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    cache = {}

    def make(bits, symmetric, group_size, pattern="2:4", dtype=torch.float32):
        key = (bits, symmetric, group_size, pattern, dtype)
        if key not in cache:
            model = pruned_llama(pattern, dtype)
            original = {n: lin.weight.detach().clone() for n, lin in block_linears(model).items()}
            q = RTNQuantizer(RTNConfig(bits=bits, symmetric=symmetric, group_size=group_size))
            stages.quantize(model, q, EngineSpec())
            out = tmp_path_factory.mktemp("ct") / "model"
            save(model, None, out, "compressed-tensors", {"case": str(key)}, quantizer=q, pattern=pattern)
            cache[key] = (model, original, out)
        return cache[key]

    return make


@pytest.mark.parametrize("bits,symmetric,group_size", CASES)
def test_ct_dequantizer_gives_the_quantised_weights_bitwise(exports, bits, symmetric, group_size):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    model, original, out = exports(bits, symmetric, group_size)
    tensors = load_file(str(out / "model.safetensors"))
    packed = [k for k in tensors if k.endswith(".weight_packed")]
    assert len(packed) == len(original) == 14
    assert all(tensors[k].dtype == torch.int32 for k in packed)
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in tensors) == (not symmetric)
    dequant = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(tensors)
    for name, lin in block_linears(model).items():
        got = dequant[f"{name}.weight"]
        assert torch.equal(got, lin.weight), name  # bitwise the project's quantised weight
        assert bool((got[original[name] == 0] == 0).all()), f"{name}: a pruned zero came back non-zero"
        torch.testing.assert_close(got, simple_rtn(original[name], bits, group_size, symmetric), rtol=0, atol=1e-6)
    assert torch.equal(dequant["lm_head.weight"], model.lm_head.weight)  # ignored: stays dense

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"], weights["strategy"]) == \
        (bits, symmetric, group_size, "group")
    assert quant["ignore"] == ["lm_head"] and quant["sparsity_config"] == {}


@pytest.mark.parametrize("bits,symmetric,group_size,dtype", [
    (4, True, 16, torch.float32), (8, True, 32, torch.float32), (4, False, 32, torch.float32),
    (8, False, 16, torch.float32), (4, True, 32, torch.bfloat16), (4, False, 16, torch.bfloat16),
])
def test_transformers_loads_the_export_on_cpu(exports, bits, symmetric, group_size, dtype):
    model, _, out = exports(bits, symmetric, group_size, dtype=dtype)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits.float()
    # dequantize=True decompresses while loading; transformers' default (decompress on the
    # first forward) handles symmetric exports but not packed asymmetric zero points.
    loaders = [{"quantization_config": CompressedTensorsConfig(dequantize=True)}] + ([{}] if symmetric else [])
    for kwargs in loaders:
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **kwargs).eval()
        with torch.no_grad():
            got = loaded(ids).logits.float()
        # bf16: the reference's rotary buffers were cast to bf16 by .to(); the loader keeps them float32
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
        torch.testing.assert_close(got, expected, **tol)
        for name, lin in block_linears(loaded).items():
            assert torch.equal(lin.weight, dict(block_linears(model))[name].weight), name


def test_per_row_group_size_exports_channel_strategy(exports):
    model, _, out = exports(4, True, 128, pattern="unstructured")  # >= every in_features
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["strategy"] == "channel" and weights["weights"]["group_size"] is None
    loaded = AutoModelForCausalLM.from_pretrained(out)  # packed; decompressed on the first forward
    assert not hasattr(loaded.model.layers[0].mlp.down_proj, "weight")
    with torch.no_grad():
        loaded(torch.zeros(1, 4, dtype=torch.long))
    for name, lin in block_linears(loaded).items():
        assert torch.equal(lin.weight, block_linears(model)[name].weight), name


def test_sparsity_metadata_is_measured_and_loaders_ignore_it(exports):
    model, original, out = exports(8, True, 16, pattern="2:4")
    meta = json.loads((out / "config.json").read_text())["wanda_sparsity"]
    zeros = sum(int((w == 0).sum()) for w in original.values())
    assert meta["format"] == "dense" and meta["sparsity_structure"] == "2:4"
    assert meta["global_sparsity"] == pytest.approx(zeros / sum(w.numel() for w in original.values()))
    assert sorted(meta["targets"]) == sorted(original) and meta["ignore"] == ["lm_head"]
    _, original_u, out_u = exports(8, True, 16, pattern="unstructured")
    assert json.loads((out_u / "config.json").read_text())["wanda_sparsity"]["sparsity_structure"] == "unstructured"


def test_unquantised_export_is_dense_with_metadata(tmp_path):
    model = pruned_llama("2:4")
    out = save(model, None, tmp_path / "m", "compressed-tensors", {}, pattern="2:4")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["wanda_sparsity"]["sparsity_structure"] == "2:4"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, lin in block_linears(loaded).items():
        assert torch.equal(lin.weight, block_linears(model)[name].weight), name


def test_requested_pattern_not_followed_is_recorded_as_unstructured(tmp_path):
    model = pruned_llama("unstructured")
    out = save(model, None, tmp_path / "m", "compressed-tensors", {}, pattern="2:4")
    meta = json.loads((out / "config.json").read_text())["wanda_sparsity"]
    assert meta["sparsity_structure"] == "unstructured" and meta["requested_pattern"] == "2:4"


def test_bad_exports_fail_before_writing_anything(tmp_path):
    model = pruned_llama("unstructured")
    q = RTNQuantizer(RTNConfig(bits=4, group_size=48))  # divides neither 64 nor 128
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        preflight(model, q)  # what the run path calls right after loading
    preflight(model, RTNQuantizer(RTNConfig(bits=4, group_size=64)), exclude="down_proj")
    preflight(model, RTNQuantizer(RTNConfig(bits=4, group_size=4096)))  # per row
    stages.quantize(model, q, EngineSpec())
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        save(model, None, tmp_path / "a", "compressed-tensors", {}, quantizer=q)
    with pytest.raises(RunError, match="quantised none"):
        save(pruned_llama("unstructured"), None, tmp_path / "b", "compressed-tensors", {},
             quantizer=RTNQuantizer(RTNConfig(bits=4, group_size=16)))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        save(model, None, tmp_path / "c", "compressed-tensors", {})
    with pytest.raises(ConfigError, match="unknown save format"):
        save(model, None, tmp_path / "d", "gguf", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no partial folders left
