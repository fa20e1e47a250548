"""Streaming: a model in safetensors shards is pruned, evaluated and saved one block at a time
from a meta-device skeleton, with the same results as the in-memory path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from wanda_pipeline.cli import main
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.evaluators.perplexity import perplexity, streamed_perplexity
from wanda_pipeline.models import find_blocks, load_model
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import finish_streaming, prune_model, streaming_io
from wanda_pipeline.tiny_models import tiny_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny LLaMA with tied embeddings in several shards (untied heads: the GPT-NeoX row below)."""
    out = tmp_path_factory.mktemp("sharded")
    model = tiny_model("llama", seed=4, layers=3, vocab_size=len(smollm2_tokenizer))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(out, max_shard_size="1MB")
    smollm2_tokenizer.save_pretrained(out)
    assert (out / "model.safetensors.index.json").exists()
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    words = "streams of blocks flow from disk to the engine and back out to new shards again".split()
    path.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(50)) for i in range(30)))
    return path


class OneBlockAtATime(WandaPruner):
    """Wanda that checks, whenever it prunes, that no other block has real weights."""

    def __init__(self, model):
        super().__init__(WandaConfig(sparsity=0.5))
        self.model, self.live = model, []

    def prune(self, weight, stats, sparsity):
        _, blocks = find_blocks(self.model)
        self.live.append([i for i, b in enumerate(blocks) if not next(b.parameters()).is_meta])
        return super().prune(weight, stats, sparsity)


def test_streamed_prune_matches_in_memory_and_holds_one_block(sharded, tokens_gen, tmp_path):
    tokens = tokens_gen(1000, 4, 24)
    dense, _, _ = load_model(str(sharded))
    prune_model(dense, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False))

    skeleton, _, info = load_model(str(sharded), stream=True)
    assert all(p.is_meta for p in find_blocks(skeleton)[1].parameters())
    spy = OneBlockAtATime(skeleton)
    io = streaming_io(skeleton, str(tmp_path / "out"))
    outcome = prune_model(skeleton, tokens, spy, LayerEngine(progress=False), source=io[0], sink=io[1])
    finish_streaming(skeleton, io, outcome)
    assert {tuple(x) for x in spy.live} == {(0,), (1,), (2,)}
    assert all(p.is_meta for p in find_blocks(skeleton)[1].parameters()), "finished blocks are released"

    written = AutoModelForCausalLM.from_pretrained(outcome.streamed_to)
    expected = dense.state_dict()
    for name, value in written.state_dict().items():
        assert torch.equal(value, expected[name]), name

    ppl_tokens = tokens_gen(1000, 1, 24 * 5, seed=1)
    want = perplexity(dense, ppl_tokens, 24, progress=False)
    # a budget of one window per pass forces five passes over the blocks
    got = streamed_perplexity(skeleton, ppl_tokens, 24, activation_bytes=1, progress=False)
    assert got[1] == want[1] == 5
    assert got[0] == pytest.approx(want[0], rel=1e-5)


@pytest.mark.slow
def test_prune_command_streams_to_the_same_saved_model(sharded, text, tmp_path, capsys):
    common = ["prune", "--model", str(sharded), "--calibration", str(text), "--nsamples", "4", "--seqlen", "24",
              "--eval-windows", "3", "--eval-seqlen", "24", "--eval-path", str(text)]
    assert main([*common, "--save_model", str(tmp_path / "mem")]) == 0
    mem_out = capsys.readouterr().out
    assert main([*common, "--save_model", str(tmp_path / "stream"), "--stream"]) == 0
    stream_out = capsys.readouterr().out
    ppl = [line for line in mem_out.splitlines() if "perplexity" in line]
    assert ppl and ppl == [line for line in stream_out.splitlines() if "perplexity" in line]
    assert not (tmp_path / "stream.partial").exists()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "stream" / "wanda_provenance.json").exists()
    assert (tmp_path / "stream" / "tokenizer.json").exists()


def test_streaming_refuses_models_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(tiny_model("llama").config.to_json_string())
    with pytest.raises(ConfigError, match="no safetensors weights"):
        load_model(str(tmp_path), stream=True)


@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox", "gemma2"])
def test_streaming_across_architectures(arch, tokens_gen, tmp_path):
    """A tied head (GPT-2), a head renamed on load (GPT-NeoX's embed_out), per-layer
    masks (Gemma-2): the streamed result equals the in-memory one."""
    from test_engine_architectures import build

    build(arch, seed=3).save_pretrained(tmp_path / "src", max_shard_size="200KB")
    tokens = tokens_gen(128, 3, 32)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    prune_model(dense, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False))

    from wanda_pipeline.engine.skeleton import build_skeleton

    skeleton = build_skeleton(tmp_path / "src", torch.float32)
    from wanda_pipeline.engine import ShardSource

    ShardSource(skeleton, tmp_path / "src")
    io = streaming_io(skeleton, str(tmp_path / "out"))
    outcome = prune_model(skeleton, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False),
                          source=io[0], sink=io[1])
    finish_streaming(skeleton, io, outcome)
    written = AutoModelForCausalLM.from_pretrained(outcome.streamed_to).state_dict()
    expected = dense.state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    ppl_tokens = tokens_gen(128, 1, 96, seed=2)
    assert streamed_perplexity(skeleton, ppl_tokens, 32, progress=False)[0] == pytest.approx(
        perplexity(dense, ppl_tokens, 32, progress=False)[0], rel=1e-5)


def test_streamed_run_resumes_after_a_crash(sharded, tokens_gen, tmp_path):
    """Streaming and checkpoints together: the rerun rewrites the finished blocks' shards from
    the checkpoint and continues; the saved shards equal an uninterrupted streamed run's."""
    tokens = tokens_gen(1000, 3, 16)

    def streamed(out, pruner, ckpt=None):
        skeleton, _, _ = load_model(str(sharded), stream=True)
        io = streaming_io(skeleton, str(out))
        outcome = prune_model(skeleton, tokens, pruner, LayerEngine(progress=False), source=io[0], sink=io[1],
                              checkpoint_dir=ckpt)
        finish_streaming(skeleton, io, outcome)
        return AutoModelForCausalLM.from_pretrained(outcome.streamed_to).state_dict(), outcome

    expected, _ = streamed(tmp_path / "ref", WandaPruner(WandaConfig(sparsity=0.5)))
    crashing = WandaPruner(WandaConfig(sparsity=0.5))
    calls, real = [], crashing.prune

    def prune(weight, stats, sparsity):
        calls.append(1)
        if len(calls) > 7:  # die inside block 1
            raise RuntimeError("out of memory")
        return real(weight, stats, sparsity)

    crashing.prune = prune
    with pytest.raises(Exception, match="out of memory"):
        streamed(tmp_path / "out", crashing, tmp_path / "ck")
    got, outcome = streamed(tmp_path / "out", WandaPruner(WandaConfig(sparsity=0.5)), tmp_path / "ck")
    assert outcome.engine.resumed_at == 1
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
