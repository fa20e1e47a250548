"""``batch_size: auto``: the per-sequence memory estimate reads the config of any family
(hidden_size / n_embd / d_model aliases), and the batch is the number of sequences that fit in
a quarter of the free memory, capped per device type and by the number of sequences."""

from __future__ import annotations

import logging
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from wanda_pipeline.engine import batching
from wanda_pipeline.engine.batching import auto_batch_size, free_bytes, per_sample_bytes


def with_config(**cfg) -> nn.Module:
    model = nn.Linear(2, 2)
    model.config = SimpleNamespace(**cfg)
    return model


def estimate(seqlen, hidden, inter, heads):
    """The documented estimate, written out: float32 hidden/MLP temporaries plus attention scores."""
    return 4 * seqlen * (8 * hidden + 3 * inter + 2 * heads * seqlen)


@pytest.mark.parametrize("cfg, dims", [
    (dict(hidden_size=48, intermediate_size=100, num_attention_heads=6), (48, 100, 6)),  # llama
    (dict(hidden_size=48, ffn_dim=200, num_attention_heads=6), (48, 200, 6)),  # opt
    (dict(n_embd=48, n_inner=None, n_head=6), (48, 4 * 48, 6)),  # gpt2: n_inner unset is 4 * n_embd
    (dict(n_embd=48, n_inner=300, n_head=6), (48, 300, 6)),
    (dict(d_model=40, num_attention_heads=5), (40, 4 * 40, 5)),  # d_model, no MLP size
])
def test_per_sample_bytes_reads_every_config_alias(cfg, dims):
    for seqlen in (7, 64):
        assert per_sample_bytes(with_config(**cfg), seqlen) == estimate(seqlen, *dims)


def test_per_sample_bytes_without_a_config_assumes_a_7b_llama():
    defaults = with_config(hidden_size=4096, intermediate_size=4 * 4096, num_attention_heads=32)
    for model in (nn.Linear(2, 2), with_config()):
        assert per_sample_bytes(model, 16) == per_sample_bytes(defaults, 16) == estimate(16, 4096, 16384, 32)


def test_per_sample_bytes_of_real_configs():
    from wanda_pipeline.tiny_models import tiny_model

    assert per_sample_bytes(tiny_model("llama"), 8) == estimate(8, 32, 64, 4)
    assert per_sample_bytes(tiny_model("opt"), 8) == estimate(8, 32, 64, 4)
    assert per_sample_bytes(tiny_model("gpt2"), 8) == estimate(8, 32, 128, 4)


MODEL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2)


def auto(monkeypatch, free, n, seqlen=8, device="cpu", model=None):
    monkeypatch.setattr(batching, "free_bytes", lambda d: free)
    return auto_batch_size(model or with_config(**MODEL), torch.zeros(n, seqlen, dtype=torch.long),
                           torch.device(device))


def test_auto_batch_is_what_fits_in_a_quarter_of_free_memory(monkeypatch):
    per = estimate(8, 16, 32, 2)
    assert auto(monkeypatch, free=4 * per * 3, n=10) == 3
    assert auto(monkeypatch, free=4 * per * 3 - 1, n=10) == 2  # floors
    assert auto(monkeypatch, free=4 * per * 5 + 4 * per // 2, n=10) == 5
    assert auto(monkeypatch, free=0, n=10) == 1  # never below one sequence
    assert auto(monkeypatch, free=4 * per - 1, n=10) == 1
    # the estimate is the given model's: a wider model fits fewer
    wide = with_config(hidden_size=64, intermediate_size=128, num_attention_heads=2)
    assert auto(monkeypatch, free=4 * estimate(8, 64, 128, 2) * 2, n=10, model=wide) == 2


def test_auto_batch_is_capped_by_sequences_and_device_type(monkeypatch):
    plenty = 1 << 50
    assert auto(monkeypatch, free=plenty, n=3) == 3
    assert auto(monkeypatch, free=plenty, n=100) == 16  # cpu cap
    assert auto(monkeypatch, free=plenty, n=100, device="cuda") == 64  # cuda cap
    assert auto(monkeypatch, free=plenty, n=100, device="meta") == 16  # other devices: the cpu cap
    assert auto(monkeypatch, free=plenty, n=30, device="cuda") == 30


def test_no_tokens_means_batch_one(monkeypatch):
    monkeypatch.setattr(batching, "free_bytes", lambda d: 1 << 50)
    assert auto_batch_size(with_config(**MODEL), None, torch.device("cpu")) == 1


def test_auto_batch_logs_its_choice(monkeypatch, caplog):
    per = estimate(8, 16, 32, 2)
    with caplog.at_level(logging.INFO, logger=batching.__name__):
        auto(monkeypatch, free=4 * per * 3, n=10)
    assert "batch_size auto: 3 (of 10 sequences; about 3 fit in free memory)" in caplog.messages


def test_free_bytes_on_cuda_is_the_free_figure_of_that_device(monkeypatch):
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return 123_000, 999_000  # (free, total)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    dev = torch.device("cuda", 1)
    assert free_bytes(dev) == 123_000 and asked == [dev]


def test_free_bytes_on_cpu_is_available_host_memory(monkeypatch):
    import psutil

    vm = namedtuple("vm", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(10_000, 4_321))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: pytest.fail("asked CUDA for a CPU device"))
    assert free_bytes(torch.device("cpu")) == 4_321
