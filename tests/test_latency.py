"""Latency evaluator on CPU, and the CUDA branch's decisions as pure functions."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.evaluators.latency import (
    LatencyConfig,
    LatencyEvaluator,
    LinearInfo,
    choose_kernel,
    is_2_4,
    plan_semi_structured,
    unavailable_reason,
)
from wanda_pipeline.plugins import discover
from wanda_pipeline.pruners.magnitude import MagnitudeConfig, MagnitudePruner
from wanda_pipeline.pruning import prune_model

QUICK = dict(prompt_tokens=8, decode_tokens=3, warmup=0, repeats=1)


def tiny_llama(pattern: str | None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if pattern:
        prune_model(model, None, MagnitudePruner(MagnitudeConfig(sparsity=0.5, pattern=pattern)),
                    LayerEngine(progress=False))
    return model


@pytest.mark.parametrize("pattern", [None, "2:4", "unstructured"])
def test_cpu_timings_exist_and_no_sparse_kernel_is_reported(pattern):
    model = tiny_llama(pattern)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = discover().create("evaluator", "latency", QUICK).evaluate(model, None)
    m = result.metrics
    assert set(m) == {"latency_prefill_ms", "latency_decode_ms_per_token", "latency_decode_tokens_per_s"}
    assert all(v > 0 for v in m.values())
    assert m["latency_decode_tokens_per_s"] == pytest.approx(1e3 / m["latency_decode_ms_per_token"])
    assert result.protocol["sparse_kernel"] == "none"
    assert "CUDA-only" in result.protocol["sparse_kernel_reason"]
    assert result.protocol["prompt_tokens"] == 8 and result.protocol["device"] == "cpu"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # timing changes nothing


def test_sparse_kernel_off_is_reported():
    result = LatencyEvaluator(LatencyConfig(sparse_kernel="off", **QUICK)).evaluate(tiny_llama("2:4"), None)
    assert result.protocol["sparse_kernel_reason"] == "sparse_kernel: off"


@pytest.mark.parametrize("options,problem", [
    ({"prompt_tokens": 0}, "prompt_tokens"), ({"device": "tpu"}, "device"), ({"repeats": -1}, "repeats"),
    ({"sparse_kernel": "magic"}, "sparse_kernel"), ({"bogus": 1}, "bogus"),
])
def test_bogus_config_is_rejected(options, problem):
    with pytest.raises(ConfigError, match=problem):
        discover().create("evaluator", "latency", options)


def test_is_2_4_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        w = torch.randn(4, 16, generator=g)
        w[torch.rand(4, 16, generator=g) < 0.55] = 0
        expected = all(int((w[r, c : c + 4] == 0).sum()) >= 2 for r in range(4) for c in range(0, 16, 4))
        assert is_2_4(w) == expected, trial
    assert not is_2_4(torch.zeros(2, 6))  # columns not a multiple of 4


def test_kernel_choice_and_availability():
    assert choose_kernel(True) == "cuSPARSELt"
    assert choose_kernel(True, force_cutlass=True) == "CUTLASS"
    assert choose_kernel(False) == "CUTLASS"
    assert "CUDA-only" in unavailable_reason("cpu", None, "auto")
    assert "Ampere" in unavailable_reason("cuda", (7, 5), "auto")
    assert unavailable_reason("cuda:0", (8, 0), "auto") is None
    assert unavailable_reason("cuda", (9, 0), "off") == "sparse_kernel: off"


def _expected_ok(lin: LinearInfo, kernel: str) -> bool:
    # cuSPARSELt: fp16/bf16 multiples of 16, no fp32; CUTLASS: fp16/bf16 (32, 64), fp32 (32, 32)
    table = {"cuSPARSELt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
             "CUTLASS": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (32, 32)}}[kernel]
    if not lin.is_2_4 or lin.dtype not in table:
        return False
    r, c = table[lin.dtype]
    return lin.out_features % r == 0 and lin.in_features % c == 0


LINEARS = [
    LinearInfo("q_proj", 4096, 4096, torch.bfloat16, True),
    LinearInfo("down_proj", 4096, 11008, torch.float16, True),
    LinearInfo("dense", 4096, 4096, torch.bfloat16, False),
    LinearInfo("fp32", 4096, 4096, torch.float32, True),
    LinearInfo("odd_rows", 48, 64, torch.bfloat16, True),
    LinearInfo("odd_cols", 64, 48, torch.float16, True),
    LinearInfo("lm_head", 32000, 4096, torch.bfloat16, False),
]


@pytest.mark.parametrize("kernel", ["cuSPARSELt", "CUTLASS"])
def test_plan_picks_exactly_the_linears_the_kernel_takes(kernel):
    ok, skipped = plan_semi_structured(LINEARS, kernel)
    assert ok == [lin.name for lin in LINEARS if _expected_ok(lin, kernel)]
    assert set(skipped) == {lin.name for lin in LINEARS} - set(ok)
    assert skipped["dense"] == "weight does not follow 2:4"
    if kernel == "cuSPARSELt":
        assert "does not take float32" in skipped["fp32"]
    else:
        assert "fp32" in ok and "odd_rows" in skipped
