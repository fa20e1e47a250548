"""A calibrated quantizer in the block loop, continued: a resumed run and a streamed run equal
the uninterrupted in-memory one; the loop's zero check; preflight; a third-party calibrated
quantizer; SparseGPT before GPTQ."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine_architectures import build
from test_gptq_engine import CFG, MaskSpy, named_linears
from transformers import AutoModelForCausalLM

from wanda_pipeline import stages
from wanda_pipeline.config import EngineSpec
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import ConfigError, PluginError, RunError
from wanda_pipeline.export.compressed_tensors import preflight as export_preflight
from wanda_pipeline.models import linear_weight_view
from wanda_pipeline.plugins import PluginConfig
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import finish_streaming, prune_model, streaming_io
from wanda_pipeline.quantizers.gptq import GPTQConfig, GPTQQuantizer


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_resumed_run_equals_the_uninterrupted_one(tokens_gen, tmp_path):
    """Crash in block 2; the rerun restores blocks 0-1 from the checkpoint (quantized weights,
    scales, zero points), quantizes only the rest, and ends with the same weights, report and
    exportable codes. Another quantizer config refuses the checkpoint."""
    from wanda_pipeline.export import save

    tokens = tokens_gen(128, 4, 16)
    cfg = GPTQConfig(bits=4, group_size=16, symmetric=False)
    reference = build("llama", seed=3)
    ref_out = prune_model(reference, tokens, WandaPruner(WandaConfig()), LayerEngine(progress=False),
                          quantizer=GPTQQuantizer(cfg))

    crashing, calls = GPTQQuantizer(cfg), []
    real = crashing.quantize_weight

    def quantize_weight(weight, stats=None):
        calls.append(1)
        if len(calls) > 2 * 7:  # 7 linears per LLaMA block: die inside block 2
            raise RuntimeError("power cut")
        return real(weight, stats)

    crashing.quantize_weight = quantize_weight

    def run(quantizer):
        return prune_model(build("llama", seed=3), tokens, WandaPruner(WandaConfig()), LayerEngine(progress=False),
                           checkpoint_dir=tmp_path / "ck", quantizer=quantizer)

    with pytest.raises(PluginError, match="power cut"):
        run(crashing)
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["finished"] == 2
    with pytest.raises(ConfigError, match="differs in: quantizer"):
        run(GPTQQuantizer(GPTQConfig(bits=4, group_size=32, symmetric=False)))

    model = build("llama", seed=3)
    resumed = GPTQQuantizer(cfg)
    outcome = prune_model(model, tokens, WandaPruner(WandaConfig()), LayerEngine(progress=False),
                          checkpoint_dir=tmp_path / "ck", quantizer=resumed)
    assert outcome.engine.resumed_at == 2 and resumed.counters["linears"] == 2 * 7
    expected = state(reference)
    assert all(torch.equal(v, expected[k]) for k, v in state(model).items())
    a, b = ref_out.quantized, outcome.quantized
    assert (a.linears, a.numel, a.bits, a.zeros_before, a.zeros_after) == \
        (b.linears, b.numel, b.bits, b.zeros_before, b.zeros_after)
    save(model, None, tmp_path / "resumed", "compressed-tensors", {}, quantizer=resumed)
    from safetensors.torch import load_file

    packed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert sum(k.endswith(".weight_packed") for k in packed) == 4 * 7, "restored blocks must export too"


def test_a_streamed_run_writes_the_in_memory_result(tokens_gen, tmp_path):
    from wanda_pipeline.engine import ShardSource
    from wanda_pipeline.engine.skeleton import build_skeleton

    build("llama", seed=5).save_pretrained(tmp_path / "src", max_shard_size="200KB")
    tokens = tokens_gen(128, 3, 32)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    in_memory = prune_model(dense, tokens, WandaPruner(WandaConfig()), LayerEngine(progress=False),
                            quantizer=GPTQQuantizer(CFG))
    skeleton = build_skeleton(tmp_path / "src", torch.float32)
    ShardSource(skeleton, tmp_path / "src")
    io = streaming_io(skeleton, str(tmp_path / "out"))
    streamed = prune_model(skeleton, tokens, WandaPruner(WandaConfig()), LayerEngine(progress=False),
                           source=io[0], sink=io[1], quantizer=GPTQQuantizer(CFG))
    finish_streaming(skeleton, io, streamed)
    written = AutoModelForCausalLM.from_pretrained(streamed.streamed_to).state_dict()
    expected = dense.state_dict()
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    with pytest.raises(ConfigError, match="streamed model .* cannot be exported quantized"):
        export_preflight(skeleton, GPTQQuantizer(CFG))  # its weights live in shards: save as 'hf'
    report = stages.quantize(skeleton, GPTQQuantizer(CFG), EngineSpec(), streamed)
    assert report.quantized_linears == in_memory.quantized.linears and report.zeros_after == \
        in_memory.quantized.zeros_after and report.bits_per_weight == pytest.approx(4 + 16 / 16)


def test_a_calibrated_quantizer_that_moves_a_pruned_zero_fails_the_run(tokens_gen):
    class Careless(GPTQQuantizer):
        def quantize_weight(self, weight, stats=None):
            return super().quantize_weight(weight, stats) + 1e-3  # like a non-integer zero point

    with pytest.raises(RunError, match=r"turned \d+ pruned zeros of block 0 'self_attn.q_proj' non-zero"):
        prune_model(build("llama"), tokens_gen(128, 2, 16), WandaPruner(WandaConfig()), LayerEngine(progress=False),
                    quantizer=Careless(CFG))


def test_after_sparsegpt_2_4_the_pattern_survives_gptq(tokens_gen):
    """SparseGPT updates the kept weights with H; GPTQ then quantizes with the same H."""
    from wanda_pipeline.pruners.sparsegpt import SparseGPTConfig, SparseGPTPruner

    model = build("llama", seed=6)
    quantizer = GPTQQuantizer(GPTQConfig(bits=4, group_size=16, symmetric=False, act_order=True))
    prune_model(model, tokens_gen(128, 3, 16), SparseGPTPruner(SparseGPTConfig(pattern="2:4")),
                LayerEngine(progress=False), quantizer=quantizer)
    for b, name, lin in named_linears(model):
        weight = linear_weight_view(lin).detach()
        assert bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), f"block {b} {name}"
        assert quantizer.codes_for(weight) is not None


def test_preflight_refuses_rtn_on_a_streamed_run_but_not_gptq():
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.plugins import discover
    from wanda_pipeline.preflight import check_quantizer
    from wanda_pipeline.stages import build_plugins

    def problems(quantizer, stream):
        spec = PipelineSpec(model={"source": "x"}, pruner={"name": "wanda"}, quantizer=quantizer,
                            engine={"stream": stream})
        return check_quantizer(spec, build_plugins(spec, discover()))

    [problem] = problems({"name": "rtn", "bits": 4}, True)
    assert isinstance(problem, ConfigError) and "use gptq" in str(problem) and "engine.stream" in str(problem)
    assert problems({"name": "gptq"}, True) == problems({"name": "rtn"}, False) == []


class ColumnGrid:
    """A third-party calibrated quantizer in miniature: a grid per input column, finer where
    the column's inputs are larger; no codes record (so no compressed-tensors export)."""

    class Config(PluginConfig):
        pass

    def __init__(self):
        self.config, self.seen = self.Config(), 0

    def required_stats(self):
        return {"col_sq_norm"}

    def quantize_weight(self, weight, stats):
        self.seen += 1
        step = 1 / (4 + stats["col_sq_norm"].sqrt())
        return torch.round(weight / step) * step

    def bits_per_weight(self, shape):
        return 8.0


def test_any_calibrated_quantizer_runs_in_the_loop_and_resumes(tokens_gen, tmp_path):
    tokens = tokens_gen(128, 2, 16)
    first = build("llama", seed=7)
    q1 = ColumnGrid()
    out = prune_model(first, tokens, MaskSpy(), LayerEngine(progress=False), checkpoint_dir=tmp_path / "ck",
                      quantizer=q1)
    assert q1.seen == out.quantized.linears == 4 * 7
    again = build("llama", seed=7)
    q2 = ColumnGrid()
    resumed = prune_model(again, tokens, MaskSpy(), LayerEngine(progress=False), checkpoint_dir=tmp_path / "ck",
                          quantizer=q2)
    assert resumed.engine.resumed_at == 4 and q2.seen == 0 and resumed.quantized.zeros_before == \
        out.quantized.zeros_before
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                  strict=True))


def test_a_block_level_pruner_runs_its_whole_block_pass_before_gptq(tokens_gen):
    """wanda + reconstruct wrapped by the calibrated quantizer: the engine still sees a block-level
    visitor (the optimisation runs), and the result is pruned and on the quantizer's grid."""
    from wanda_pipeline.regional.config import ReconstructConfig

    model = build("llama", seed=4)
    quantizer = GPTQQuantizer(CFG)
    outcome = prune_model(model, tokens_gen(128, 2, 16), WandaPruner(WandaConfig()), LayerEngine(progress=False),
                          quantizer=quantizer, reconstruct=ReconstructConfig(iterations=2, samples=2, lr=1e-4))
    assert outcome.counters["reconstruct_steps"] > 0
    for b, name, lin in named_linears(model):
        weight = linear_weight_view(lin).detach()
        assert float((weight == 0).float().mean()) >= 0.5, f"block {b} {name}"
        assert quantizer.codes_for(weight) is not None, f"block {b} {name}"
