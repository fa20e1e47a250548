"""Capture on hand-written toy models: blocks that return tuples, a model loop that reads its
layers' attributes, per-block arguments interned by value, the refusals, and ``run_tail``
(the model's head applied to hidden states computed elsewhere)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from wanda_pipeline.engine.capture import TensorStore, capture, run_tail
from wanda_pipeline.errors import ConfigError

D, V = 8, 16
CPU = torch.device("cpu")


class Block(nn.Module):
    def __init__(self, kind: str, tuple_out: bool):
        super().__init__()
        self.kind, self.tuple_out, self.lin = kind, tuple_out, nn.Linear(D, D)

    def forward(self, hidden_states, scale, note=None):
        out = torch.tanh(self.lin(hidden_states)) * scale
        return (out, None) if self.tuple_out else out


class Toy(nn.Module):
    """Reads ``layer.kind`` in its loop (as models read an attention type) to pick an argument."""

    def __init__(self, tuple_out=True, mix=(), extra=None, by_keyword=False, skip=(), positional=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.layers = nn.ModuleList(Block(k, tuple_out) for k in "aba")
        self.scales = {"a": torch.tensor([1.0, 0.5] * (D // 2)), "b": torch.tensor([2.0] * D)}
        self.tuple_out, self.mix, self.extra, self.by_keyword, self.skip = tuple_out, mix, extra, by_keyword, skip
        self.positional = positional  # pass ``extra`` as a positional argument instead of ``note=``
        self.config = SimpleNamespace(model_type="toy")

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            if i in self.skip:
                continue
            kwargs = {"note": self.extra} if self.extra is not None and not self.positional else {}
            scale = self.scales[layer.kind].clone()  # equal, not identical, tensors
            if self.positional:
                out = layer(h, scale, self.extra)
            else:
                out = layer(hidden_states=h, scale=scale, **kwargs) if self.by_keyword else layer(h, scale, **kwargs)
            h = out[0] if self.tuple_out else out
            if i in self.mix:
                h = h + 1
        return SimpleNamespace(logits=self.head(h))


def test_tuple_blocks_and_layer_attributes_are_captured(tokens_gen):
    model = Toy()
    tokens = tokens_gen(V, 5, 6, seed=1)
    got = capture(model, model.layers, tokens, 2, CPU, CPU)
    assert got.output_mode == "tuple"
    assert [t.shape[0] for t in got.inputs] == [2, 2, 1]
    for i, t in enumerate(got.inputs):
        assert torch.equal(t, model.embed(tokens[2 * i : 2 * i + 2]).detach())
    for index, kind in enumerate("aba"):
        calls = got.block_calls(index)
        assert len(calls) == 3 and all(kw == {} for _, kw in calls)
        assert all(torch.equal(args[0], model.scales[kind]) for args, _ in calls)
    # one stored tensor per distinct value: two scales, shared by blocks and batches
    assert got.distinct == 2 == len(got.store)
    assert got.block_calls(0)[0][0][0] is got.block_calls(2)[1][0][0]
    assert isinstance(model.layers[0], Block)  # the recorders are gone again


def test_tensor_blocks_are_captured_in_tensor_mode(tokens_gen):
    model = Toy(tuple_out=False)
    got = capture(model, model.layers, tokens_gen(V, 2, 4), 2, CPU, CPU)
    assert got.output_mode == "tensor" and len(got.inputs) == 1


@pytest.mark.parametrize("tuple_out", [True, False])
def test_run_tail_applies_what_follows_the_blocks(tuple_out, tokens_gen):
    model = Toy(tuple_out=tuple_out)
    tokens = tokens_gen(V, 3, 5, seed=2)
    got = capture(model, model.layers, tokens, 3, CPU, CPU)
    h = got.inputs[0]
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            args, kwargs = got.block_calls(i)[0]
            out = layer(h, *args, **kwargs)
            h = out[0] if tuple_out else out
        logits = run_tail(model, model.layers, tokens, h, got.output_mode).logits
        torch.testing.assert_close(logits, model(tokens).logits)
        other = run_tail(model, model.layers, tokens, torch.zeros_like(h), got.output_mode).logits
    torch.testing.assert_close(other, model.head(torch.zeros_like(h)).detach())
    assert isinstance(model.layers[2], Block)


def test_hidden_states_passed_by_keyword_are_captured(tokens_gen):
    model = Toy(by_keyword=True)
    tokens = tokens_gen(V, 2, 4)
    got = capture(model, model.layers, tokens, 2, CPU, CPU)
    assert torch.equal(got.inputs[0], model.embed(tokens).detach())
    assert got.block_calls(1)[0][0] == () and torch.equal(got.block_calls(1)[0][1]["scale"], model.scales["b"])


@pytest.mark.parametrize("toy", [dict(mix={0, 1}), dict(mix={0}), dict(mix={1}), dict(skip={1})])
def test_a_model_that_changes_or_skips_hidden_states_between_blocks_is_refused(toy, tokens_gen):
    model = Toy(**toy)
    with pytest.raises(ConfigError, match=r"Toy \(toy\): its forward does not pass each decoder block the previous "
                                          r"block's output unchanged \(it transforms or mixes hidden states") as err:
        capture(model, model.layers, tokens_gen(V, 2, 4), 1, CPU, CPU)
    assert str(err.value).endswith("so the layer engine cannot run it block by block; this architecture is not "
                                   "supported by the layer engine")
    assert isinstance(model.layers[0], Block)


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
def test_a_cache_object_among_block_arguments_is_refused(tokens_gen, positional):
    class Cache:
        pass

    model = Toy(extra=Cache(), positional=positional)
    del model.config  # no config: the model type is unknown
    with pytest.raises(ConfigError) as err:
        capture(model, model.layers, tokens_gen(V, 2, 4), 2, CPU, CPU)
    msg = str(err.value)
    assert "Toy (?)" in msg and "block 0 arguments of type Cache" in msg and "not supported" in msg


def test_plain_and_nested_arguments_are_kept(tokens_gen):
    extra = {"flags": (True, 3, 0.5, "x", None, torch.float16), "t": [torch.ones(2)]}
    model = Toy(extra=extra)
    got = capture(model, model.layers, tokens_gen(V, 2, 4), 2, CPU, CPU)
    note = got.block_calls(1)[0][1]["note"]
    assert note["flags"] == extra["flags"] and isinstance(note["t"], list) and torch.equal(note["t"][0], torch.ones(2))


def test_tensor_store_interns_by_shape_dtype_and_value():
    store = TensorStore(CPU)
    a = store.intern(torch.ones(3))
    assert store.intern(torch.ones(3)) is a and store.intern(a) is a
    assert store.intern(torch.ones(3, dtype=torch.float64)) is not a
    assert store.intern(torch.ones(4)) is not a and store.intern(torch.zeros(3)) is not a
    assert len(store) == 4
