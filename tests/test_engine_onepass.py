"""passes=1 pieces: joining the recorded per-batch block arguments into one call, and the
statistics each linear's pre-hook hands the visitor (values, not just the masks they lead to)."""

from __future__ import annotations

import pytest
import torch
from test_engine_architectures import SAMPLES, SEQLEN, build

import wanda_pipeline.engine.onepass as onepass
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.engine.onepass import join_calls
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view

ONE = torch.ones(1)  # one object shared by both batches


def _h(n):
    return torch.randn(n, 4, 8)


def test_one_batch_is_passed_through_untouched():
    h, mask, pos = _h(3), torch.ones(3, 4), torch.arange(4)[None]
    hidden, rest, kwargs = join_calls([h], [((mask,), {"position_ids": pos})])
    assert hidden is h and rest[0] is mask and kwargs["position_ids"] is pos


def test_shared_and_per_sample_arguments_are_joined():
    shared_row, scalar = torch.randn(1, 4, 4), torch.tensor(0.5)
    same_full = torch.randn(2, 4)                   # one interned object, batched along dim 0
    flat = [torch.arange(2), torch.arange(2) + 10]  # 1-D per-sample (e.g. lengths)
    calls = [((shared_row, [same_full, flat[i]]), {"scale": scalar, "n": 7, "cfg": {"a": (1, 2)}}) for i in range(2)]
    hidden, rest, kwargs = join_calls([_h(2), _h(2)], calls)
    assert hidden.shape == (4, 4, 8)
    assert rest[0] is shared_row and kwargs["scale"] is scalar  # broadcast over any batch
    assert isinstance(rest, tuple) and isinstance(rest[1], list)
    assert torch.equal(rest[1][0], torch.cat([same_full, same_full]))
    assert torch.equal(rest[1][1], torch.cat(flat))
    assert kwargs["n"] == 7 and kwargs["cfg"] == {"a": (1, 2)}


def test_distinct_batch_size_one_tensors_are_concatenated():
    a, b = torch.randn(1, 6), torch.randn(1, 6)
    _, rest, _ = join_calls([_h(1), _h(1)], [((a,), {}), ((b,), {})])
    assert torch.equal(rest[0], torch.cat([a, b]))


@pytest.mark.parametrize("first, second, message", [
    ((torch.tensor(1.0),), (torch.tensor(2.0),),
     "block argument args[0] has shapes [(), ()] that are neither shared nor batched along dim 0"),
    ((ONE, torch.ones(3, 2)), (ONE, torch.ones(5, 2)),
     "block argument args[1] has shapes [(3, 2), (5, 2)] that are neither shared nor batched along dim 0"),
    (([1, 2],), ([1],), "block argument args[0] differs in structure between batches; use passes: 2"),
    (((1, 2),), ([1, 2],), "block argument args[0] differs in structure between batches; use passes: 2"),
    ((1,), (2,), "block argument args[0] differs between batches ([1, 2]); use passes: 2"),
])
def test_arguments_that_cannot_be_joined_are_refused_where_they_are(first, second, message):
    with pytest.raises(ConfigError) as err:
        join_calls([_h(2), _h(2)], [(first, {}), (second, {})])
    assert message in str(err.value) and str(err.value).endswith("use passes: 2")


def test_differing_plain_values_are_quoted_three_at_most():
    calls = [((v,), {}) for v in (1, 2, 3, 4, 5)]
    with pytest.raises(ConfigError) as err:
        join_calls([_h(1)] * 5, calls)
    assert "differs between batches ([1, 2, 3]); use passes: 2" in str(err.value)


@pytest.mark.parametrize("first, second, message", [
    ({"mask": torch.ones(2, 4)}, {"mask": torch.ones(3, 4)}, "block argument kwargs.mask has shapes"),
    ({"a": 1}, {"b": 1}, "block argument kwargs differs in keys between batches; use passes: 2"),
    ({"p": {"a": 1}}, {"p": {"b": 1}}, "block argument kwargs.p differs in keys between batches; use passes: 2"),
    ({"p": (1,)}, {"p": (2,)}, "block argument kwargs.p[0] differs between batches"),
])
def test_keyword_arguments_that_cannot_be_joined_name_their_key(first, second, message):
    with pytest.raises(ConfigError) as err:
        join_calls([_h(2), _h(2)], [((), first), ((), second)])
    assert message in str(err.value)


def col_sq_norms(model, tokens) -> dict:
    """Per linear: sum over every token of its squared input columns, over the number of
    sequences, from one whole-model forward."""
    sums, hooks = {}, []
    for index, block in enumerate(find_blocks(model)[1]):
        for name, lin in find_linears(block).items():
            sums[(index, name)] = torch.zeros(linear_weight_view(lin).shape[1])

            def hook(_m, args, _out, key=(index, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[key] += (x * x).sum(dim=0)

            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: v / tokens.shape[0] for k, v in sums.items()}


class Recorder:
    """Changes nothing; records what each visit receives."""

    one_pass = True

    def __init__(self):
        self.stats, self.blocks = {}, {}

    def required_stats(self):
        return {"col_sq_norm"}

    def visit(self, index, block, linears, stats):
        for name in linears:
            self.stats[(index, name)] = stats[name]["col_sq_norm"]
            self.blocks[(index, name)] = block
        return False


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_one_pass_statistics_equal_a_whole_model_forward(arch, tokens_gen):
    """OPT flattens its MLP input to (batch * seq, hidden): only the sample count the engine
    passes keeps the mean per calibration sequence."""
    model = build(arch, seed=5)
    tokens = tokens_gen(128, SAMPLES, SEQLEN)
    want = col_sq_norms(model, tokens)
    rec = Recorder()
    LayerEngine(progress=False, passes=1).run(model, tokens, rec)
    assert rec.stats.keys() == want.keys()
    blocks = find_blocks(model)[1]
    for (index, name), value in want.items():
        assert rec.blocks[(index, name)] is blocks[index]
        torch.testing.assert_close(rec.stats[(index, name)], value, rtol=1e-4, atol=1e-6, msg=f"{index} {name}")


def test_linears_sharing_one_input_accumulate_it_once(tokens_gen, monkeypatch):
    """q, k and v (and gate and up) read the same tensor: one accumulator set serves them."""
    made = []
    real = onepass.make_accumulators

    def counting(names, in_features, device):
        made.append(in_features)
        return real(names, in_features, device)

    monkeypatch.setattr(onepass, "make_accumulators", counting)
    model = build("llama", seed=1)
    LayerEngine(progress=False, passes=1).run(model, tokens_gen(128, 2, 16), Recorder())
    # per block: q/k/v input, o input, gate/up input, down input
    assert made == [32, 32, 32, 64] * len(find_blocks(model)[1])
