"""Perplexity of a streamed model (blocks read from safetensors shards one at a time) through
the evaluator: the same number and protocol as the in-memory model, with batches of several
windows, and as many passes over the blocks as the activation budget allows."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from wanda_pipeline.engine import ShardSource
from wanda_pipeline.engine.skeleton import build_skeleton
from wanda_pipeline.evaluators.perplexity import PerplexityConfig, PerplexityEvaluator, perplexity, streamed_perplexity
from wanda_pipeline.tiny_models import tiny_model

VOCAB = 64


class Tok:
    """Word lengths as token ids: enough text for several windows, no tokenizer files."""

    def __call__(self, text, return_tensors=None):
        return SimpleNamespace(input_ids=torch.tensor([[(len(w) * 7 + i) % VOCAB for i, w in enumerate(text.split())]]))


def saved(model, folder):
    model.save_pretrained(folder, max_shard_size="100KB")
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def skeleton_of(folder):
    skeleton = build_skeleton(folder, torch.float32)
    ShardSource(skeleton, folder)  # marks it as streamed from the folder
    return skeleton


def test_streamed_evaluator_equals_the_in_memory_one(tmp_path):
    dense = saved(tiny_model("llama", seed=5, layers=3, vocab_size=VOCAB), tmp_path / "m")
    (tmp_path / "eval.txt").write_text(" ".join("x" * (1 + i % 6) for i in range(200)))
    config = PerplexityConfig(dataset="c4", path=str(tmp_path / "eval.txt"), seqlen=16, windows=5, batch_size=2,
                              stream_activation_bytes=1)
    want = PerplexityEvaluator(config).evaluate(dense, Tok())
    skeleton = skeleton_of(tmp_path / "m")
    assert all(p.is_meta for p in skeleton.parameters()), "nothing read before the evaluation"
    got = PerplexityEvaluator(config).evaluate(skeleton, Tok())
    assert got.protocol == want.protocol and got.protocol["windows"] == 5
    assert got.metrics["ppl_c4"] == pytest.approx(want.metrics["ppl_c4"], rel=1e-5)


def nll_by_hand(model, tokens, seqlen, windows):
    """exp of the mean over windows of each window's mean next-token NLL, one window at a time."""
    total = 0.0
    with torch.no_grad():
        for w in range(windows):
            ids = tokens.reshape(-1)[w * seqlen : (w + 1) * seqlen].reshape(1, -1)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            total += float(-logp.gather(1, ids[0, 1:, None]).mean())
    return math.exp(total / windows)


@pytest.mark.parametrize("budget_windows,batch_size", [(4, 2), (3, 1), (1, 2)])
def test_activation_budget_sets_the_windows_per_pass(budget_windows, batch_size, tmp_path, monkeypatch):
    """The budget holds a pass's block inputs and outputs in float32 (2 * seqlen * hidden * 4 bytes
    a window), rounded down to whole batches and at least one batch. OPT with an embedding
    projection: the hidden size (32) is not the embedding width (16)."""
    cfg = AutoConfig.for_model("opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=64, word_embed_proj_dim=16, vocab_size=VOCAB)
    torch.manual_seed(6)
    dense = saved(AutoModelForCausalLM.from_config(cfg), tmp_path / "m")
    seqlen, windows = 8, 7
    tokens = torch.randint(0, VOCAB, (1, windows * seqlen + 3), generator=torch.Generator().manual_seed(7))
    passes = []
    load = ShardSource.load

    def counting_load(self, index, device):
        if index == 0:
            passes.append(index)
        return load(self, index, device)

    monkeypatch.setattr(ShardSource, "load", counting_load)
    per_window = 2 * seqlen * 32 * 4
    ppl, used = streamed_perplexity(skeleton_of(tmp_path / "m"), tokens, seqlen, batch_size=batch_size,
                                    activation_bytes=budget_windows * per_window, progress=False)
    per_pass = max(batch_size, budget_windows // batch_size * batch_size)
    assert used == windows and len(passes) == math.ceil(windows / per_pass)
    assert ppl == pytest.approx(nll_by_hand(dense, tokens, seqlen, windows), rel=1e-5)
    assert ppl == pytest.approx(perplexity(dense, tokens, seqlen, progress=False)[0], rel=1e-5)
