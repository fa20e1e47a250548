"""The layer engine on tiny random models of four families, against full-model forwards."""

import pytest
import torch

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.tiny_models import tiny_model

FAMILIES = ["llama", "qwen2", "opt", "gpt2"]


class Recorder:
    """A visitor that keeps the statistics and changes nothing."""

    def __init__(self):
        self.stats = {}

    def required_stats(self):
        return {"col_sq_norm"}

    def visit(self, index, block, linears, stats):
        self.stats[index] = {k: v["col_sq_norm"].clone() for k, v in stats.items()}
        return False


def reference_stats(model, tokens):
    """Reference WrappedGPT.add_batch, one sample per forward of the whole model:
    scaler *= n/(n+1); n += 1; scaler += ||x_j||^2 / n."""
    _, blocks = find_blocks(model)
    out, hooks = {}, []
    for b, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            cols = linear_weight_view(lin).shape[1]
            state = {"scaler": torch.zeros(cols), "n": 0}
            out[(b, name)] = state

            def hook(_m, args, _o, state=state):
                inp = args[0].reshape(-1, args[0].shape[-1]).t().float()
                state["scaler"] *= state["n"] / (state["n"] + 1)
                state["n"] += 1
                state["scaler"] += torch.norm(inp, p=2, dim=1) ** 2 / state["n"]

            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(tokens.shape[0]):
            model(input_ids=tokens[i : i + 1], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: v["scaler"] for k, v in out.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_statistics_match_full_forward(family, tokens_gen):
    model = tiny_model(family, seed=0, layers=3)
    tokens = tokens_gen(model.config.vocab_size, 5, 24)
    rec = Recorder()
    LayerEngine(progress=False).run(model, tokens, rec)
    ref = reference_stats(model, tokens)
    assert len(rec.stats) == 3
    for (b, name), expected in ref.items():
        torch.testing.assert_close(rec.stats[b][name], expected, rtol=1e-5, atol=1e-6)


# What the next block sees after pruning (the pruned outputs, not the dense ones) is checked in
# tests/test_engine_architectures.py::test_each_block_sees_the_pruned_blocks_before_it against an
# independent forward through a masked copy; a check on an already-pruned model cannot see it.


def test_batch_size_and_offload_do_not_change_statistics(tokens_gen):
    model = tiny_model("llama", seed=2, layers=2)
    tokens = tokens_gen(model.config.vocab_size, 6, 20, seed=2)
    a, b = Recorder(), Recorder()
    LayerEngine(batch_size=1, progress=False).run(model, tokens, a)
    LayerEngine(batch_size=3, offload_activations=False, progress=False).run(model, tokens, b)
    for block in a.stats:
        for name in a.stats[block]:
            torch.testing.assert_close(a.stats[block][name], b.stats[block][name], rtol=1e-4, atol=1e-5)


def test_capture_passes_rotary_embeddings_and_mask(tokens_gen):
    model = tiny_model("llama", seed=0, layers=2)
    captured = LayerEngine(progress=False).capture(model, tokens_gen(128, 2, 8))
    assert len(captured.inputs) == 2 and captured.inputs[0].shape == (1, 8, 32)
    rest, kwargs = captured.block_calls(1)[0]
    assert "position_embeddings" in kwargs
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape[-2] == 8
    # one rotary table for both blocks and both batches: equal tensors are stored once
    assert captured.block_calls(0)[1][1]["position_embeddings"][0] is cos


def test_block_discovery_does_not_assume_model_layers():
    paths = {f: find_blocks(tiny_model(f))[0] for f in FAMILIES}
    assert paths == {"llama": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers",
                     "gpt2": "transformer.h"}


def test_filter_leaves_lm_head_and_embeddings_alone(tokens_gen):
    model = tiny_model("llama", seed=3)
    emb = model.get_input_embeddings().weight.clone()
    head = model.lm_head.weight.clone()
    engine = LayerEngine(progress=False, exclude=r"mlp\.")
    prune_model(model, tokens_gen(128, 2, 16), WandaPruner(WandaConfig(sparsity=0.5)), engine)
    assert torch.equal(model.get_input_embeddings().weight, emb) and torch.equal(model.lm_head.weight, head)
    _, blocks = find_blocks(model)
    assert float((blocks[0].mlp.up_proj.weight == 0).float().mean()) == 0.0
    assert float((blocks[0].self_attn.q_proj.weight == 0).float().mean()) == 0.5


def test_report_has_one_row_per_block_and_no_device_peak_off_cuda(tokens_gen):
    model = tiny_model("llama", seed=5, layers=3)
    outcome = prune_model(model, tokens_gen(128, 2, 8), WandaPruner(WandaConfig(sparsity=0.5)),
                          LayerEngine(progress=False))
    rows = outcome.engine.block_metrics()
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["block_seconds"] > 0 for r in rows)
    assert outcome.engine.peak_device_bytes == [] and all("peak_device_bytes" not in r for r in rows)


def test_only_the_current_block_leaves_the_model_device(tokens_gen):
    """Blocks go back to the CPU after their turn; activations are kept on the store device."""
    seen = []

    class Where(Recorder):
        def visit(self, index, block, linears, stats):
            seen.append((index, {p.device.type for p in block.parameters()}))
            return False

    model = tiny_model("llama", seed=6, layers=2)
    engine = LayerEngine(progress=False, offload_activations=True)
    assert engine.store_device.type == "cpu" and LayerEngine(device="meta").store_device.type == "cpu"
    assert LayerEngine(device="meta", offload_activations=False).store_device.type == "meta"
    engine.run(model, tokens_gen(128, 2, 8), Where())
    assert seen == [(0, {"cpu"}), (1, {"cpu"})]
