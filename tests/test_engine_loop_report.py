"""The layer loop's bookkeeping: what the report says (blocks, capture and per-block seconds,
peak device bytes, tracker rows), which device blocks are loaded on, where finished blocks go
with and without a thread limit, and passes=1 statistics and per-batch outputs."""

from __future__ import annotations

import time

import pytest
import torch

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.engine.loop import EngineReport
from wanda_pipeline.engine.source import ModelSource
from wanda_pipeline.models import find_blocks
from wanda_pipeline.tiny_models import tiny_model


def test_block_metrics_rows_count_from_the_resumed_block_and_carry_peaks():
    report = EngineReport(blocks=5, seconds_per_block=[0.5, 0.25, 2.0], peak_device_bytes=[100, 300],
                          resumed_at=2)
    assert report.block_metrics() == [
        {"step": 2, "block_seconds": 0.5, "peak_device_bytes": 100.0},
        {"step": 3, "block_seconds": 0.25, "peak_device_bytes": 300.0},
        {"step": 4, "block_seconds": 2.0},  # no peak recorded for it
    ]
    assert all(isinstance(r["peak_device_bytes"], float) for r in report.block_metrics()[:2])


def test_on_cuda_the_peak_is_reset_per_block_and_read_for_that_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("peak", d)) or 4096)
    engine = LayerEngine(device="cuda:1", progress=False)
    engine._reset_peak()
    assert engine._peak() == 4096
    assert calls == [("reset", torch.device("cuda:1")), ("peak", torch.device("cuda:1"))]
    cpu = LayerEngine(device="cpu", progress=False)
    cpu._reset_peak()
    assert cpu._peak() is None and len(calls) == 2  # off CUDA nothing is asked


class Keep:
    """Changes nothing; records what the engine hands over."""

    one_pass = True

    def __init__(self):
        self.seen = []

    def required_stats(self):
        return {"col_sq_norm"}

    def visit(self, index, block, linears, stats):
        for name in linears:
            self.seen.append((index, name, block, stats[name]["col_sq_norm"].clone()))
        return False


class Slow(Keep):
    def visit(self, index, block, linears, stats):
        time.sleep(0.02)
        return super().visit(index, block, linears, stats)


def test_report_counts_blocks_and_times_capture_and_blocks(tokens_gen):
    model = tiny_model("llama", seed=1, layers=3)
    t0 = time.perf_counter()
    report = LayerEngine(progress=False).run(model, tokens_gen(128, 2, 8), Slow())
    total = time.perf_counter() - t0
    assert report.blocks == 3 and report.resumed_at == 0
    assert len(report.seconds_per_block) == 3 and all(0.02 <= s < total for s in report.seconds_per_block)
    assert 0 < report.capture_seconds < total - sum(report.seconds_per_block) + 1e-3


class RecordingSource(ModelSource):
    def __init__(self, model):
        super().__init__(model)
        self.loads = []

    def load(self, index, device):
        self.loads.append((index, device))
        return super().load(index, device)


class ListSink:
    def __init__(self):
        self.put_blocks = []

    def put(self, index, block):
        self.put_blocks.append((index, block))


class MemoryCheckpoint:
    def __init__(self):
        self.saved = {}

    def start(self, n_blocks):
        return 0

    def save(self, index, state, outputs):
        self.saved[index] = ({k: v.clone() for k, v in state.items()}, [o.clone() for o in outputs])


@pytest.mark.parametrize("threads", [None, 1])
def test_blocks_come_from_the_source_on_the_engine_device_and_go_to_the_sink(threads, tokens_gen):
    model = tiny_model("llama", seed=2, layers=2)
    source, sink, ckpt = RecordingSource(model), ListSink(), MemoryCheckpoint()
    LayerEngine(device="cpu", progress=False, threads=threads).run(model, tokens_gen(128, 2, 8), Keep(), source,
                                                                     sink, ckpt)
    _, blocks = find_blocks(model)
    assert source.loads == [(0, torch.device("cpu")), (1, torch.device("cpu"))]
    assert [(i, b) for i, b in sink.put_blocks] == [(0, blocks[0]), (1, blocks[1])]
    assert sorted(ckpt.saved) == [0, 1]
    state, outputs = ckpt.saved[0]  # no block_state on the visitor: the weights of every linear
    assert set(state) == {f"{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                    "mlp.down_proj")}
    assert torch.equal(state["mlp.up_proj.weight"], blocks[0].mlp.up_proj.weight)
    assert len(outputs) == 2 and outputs[0].shape == (1, 8, 32)  # batch_size 1: one output per sequence


class WithState(Keep):
    def __init__(self):
        super().__init__()
        self.asked = []

    def block_state(self, index, linears):
        self.asked.append((index, sorted(linears)))
        return {"mask": torch.full((2,), float(index))}


def test_a_visitor_with_block_state_decides_what_is_checkpointed(tokens_gen):
    model = tiny_model("llama", seed=3, layers=2)
    visitor, ckpt = WithState(), MemoryCheckpoint()
    LayerEngine(progress=False, include="mlp").run(model, tokens_gen(128, 2, 8), visitor, checkpoint=ckpt)
    assert visitor.asked == [(i, ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]) for i in (0, 1)]
    assert [ckpt.saved[i][0]["mask"].tolist() for i in (0, 1)] == [[0.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_one_pass_statistics_equal_two_pass_ones_for_a_visitor_that_changes_nothing(family, tokens_gen):
    tokens = tokens_gen(128, 4, 8, seed=4)
    seen = {}
    for passes in (1, 2):
        model = tiny_model(family, seed=4, layers=2)
        visitor = Keep()
        LayerEngine(progress=False, passes=passes, batch_size=2).run(model, tokens, visitor)
        _, blocks = find_blocks(model)
        assert all(b is blocks[i] for i, _, b, _ in visitor.seen)  # the block being visited
        seen[passes] = {(i, n): s for i, n, _, s in visitor.seen}
    assert seen[1].keys() == seen[2].keys()
    for key, value in seen[2].items():
        torch.testing.assert_close(seen[1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size, sizes", [(2, [2, 2]), (1, [1, 1, 1]), (3, [3])])
def test_one_pass_outputs_are_split_back_into_the_calibration_batches(batch_size, sizes, tokens_gen):
    model = tiny_model("llama", seed=5, layers=2)
    tokens = tokens_gen(128, sum(sizes), 8, seed=5)
    ckpt, ref = MemoryCheckpoint(), MemoryCheckpoint()
    LayerEngine(progress=False, passes=1, batch_size=batch_size).run(model, tokens, Keep(), checkpoint=ckpt)
    LayerEngine(progress=False, passes=2, batch_size=batch_size).run(model, tokens, Keep(), checkpoint=ref)
    for index in (0, 1):
        outputs = ckpt.saved[index][1]
        assert [o.shape[0] for o in outputs] == sizes
        for got, want in zip(outputs, ref.saved[index][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
