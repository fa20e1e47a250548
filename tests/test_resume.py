"""Resume after a crash: real `wanda-pipeline prune` processes killed with SIGKILL, rerun,
and compared with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.pruners.sparsegpt import SparseGPTConfig, SparseGPTPruner
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.tiny_models import tiny_model

BLOCKS = 4
# Runs the real CLI, but SIGKILLs itself at a chosen point: after block K's checkpoint is
# committed ("after"), or halfway through writing one of block K's files ("mid-write").
KILLER = """
import os, signal, sys
from wanda_pipeline.engine import checkpoint, sink
where, block = sys.argv[1], int(sys.argv[2])
save, real_write = checkpoint.Checkpoint.save, sink.write_tensors
def save_then_die(self, index, *a):
    if where == "mid-write" and index == block:
        def half(tensors, path, metadata=None):
            real_write(tensors, path, metadata)
            os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written, not yet renamed
        sink.write_tensors = half
    save(self, index, *a)
    if where == "after" and index == block:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpoint.save = save_then_die
from wanda_pipeline.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny-resume")
    tiny_model("llama", seed=0, layers=BLOCKS, vocab_size=len(smollm2_tokenizer)).save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex my jovial box".split()
    path.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(40)))
    return path


def prune_args(model_dir, calib, out, ckpt, method="wanda") -> list[str]:
    return ["prune", "--model", str(model_dir), "--calibration", str(calib), "--nsamples", "6", "--seqlen", "32",
            "--eval-windows", "0", "--prune_method", method, "--save_model", str(out), "--checkpoint_dir", str(ckpt)]


def cli(args: list[str], killer: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    if killer:
        cmd = [sys.executable, "-c", KILLER, killer[0], str(killer[1]), *args]
    else:
        cmd = [str(Path(sys.executable).parent / "wanda-pipeline"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=300)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_killed_runs_resume_to_identical_masks(model_dir, calib, tmp_path):
    """Killed after block 0 is committed, then killed again halfway through writing block 2's
    checkpoint, then finished: the saved model equals an uninterrupted run's. In between, a
    run with another pruner config is refused."""
    ref = cli(prune_args(model_dir, calib, tmp_path / "ref", tmp_path / "ck-ref"))
    assert ref.returncode == 0, ref.stderr
    assert not (tmp_path / "ck-ref").exists(), "checkpoints are removed after a successful save"

    ckpt, out = tmp_path / "ck", tmp_path / "out"
    first = cli(prune_args(model_dir, calib, out, ckpt), killer=("after", 0))
    assert first.returncode == -signal.SIGKILL and not out.exists()
    assert json.loads((ckpt / "manifest.json").read_text())["finished"] == 1

    other = cli([*prune_args(model_dir, calib, tmp_path / "other", ckpt), "--sparsity_ratio", "0.6"])
    assert other.returncode == 2
    assert "belongs to another run" in other.stderr and "--no_resume" in other.stderr and "pruner" in other.stderr

    second = cli(prune_args(model_dir, calib, out, ckpt), killer=("mid-write", 2))
    assert second.returncode == -signal.SIGKILL
    assert "resuming at block 1 of 4" in second.stdout
    assert list(ckpt.glob("*.tmp")), "the kill came halfway through a write"
    assert json.loads((ckpt / "manifest.json").read_text())["finished"] == 2

    third = cli(prune_args(model_dir, calib, out, ckpt))
    assert third.returncode == 0, third.stderr
    assert f"resuming at block 2 of {BLOCKS}" in third.stdout
    expected, got = weights(tmp_path / "ref"), weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not ckpt.exists()


def _run(model, tokens, pruner, ckpt, resume=True):
    return prune_model(model, tokens, pruner, LayerEngine(progress=False), checkpoint_dir=ckpt, resume=resume)


def test_crash_mid_run_resumes_in_process(tokens_gen, tmp_path):
    """SparseGPT (it updates weights, so the checkpoint holds weights, not just masks) crashes
    at block 2; a rerun resumes there, prunes only the rest, and ends with the same weights."""
    tokens = tokens_gen(128, 4, 16)
    config = SparseGPTConfig(sparsity=0.5)
    reference = tiny_model("llama", seed=3, layers=BLOCKS)
    prune_model(reference, tokens, SparseGPTPruner(config), LayerEngine(progress=False))

    crashing = SparseGPTPruner(config)
    calls = []
    real = crashing.prune

    def prune(weight, stats, sparsity):
        calls.append(1)
        if len(calls) > 2 * 7:  # 7 linears per LLaMA block: die inside block 2
            raise RuntimeError("power cut")
        return real(weight, stats, sparsity)

    crashing.prune = prune
    with pytest.raises(Exception, match="power cut"):
        _run(tiny_model("llama", seed=3, layers=BLOCKS), tokens, crashing, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["finished"] == 2

    model = tiny_model("llama", seed=3, layers=BLOCKS)
    resumed = SparseGPTPruner(config)
    counted = []
    inner = resumed.prune
    resumed.prune = lambda w, s, r: counted.append(1) or inner(w, s, r)
    outcome = _run(model, tokens, resumed, tmp_path / "ck")
    assert outcome.engine.resumed_at == 2 and len(counted) == 2 * 7
    assert [r["step"] for r in outcome.engine.block_metrics()] == [2, 3]
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["finished"] == BLOCKS
    assert {"model", "calibration", "pruner", "allocation"} <= manifest["fingerprint"].keys()
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_refuses_a_folder_that_is_not_a_checkpoint(tokens_gen, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        _run(tiny_model("llama", layers=2), tokens_gen(128, 2, 8), WandaPruner(WandaConfig()), tmp_path)
    assert (tmp_path / "precious.txt").exists()


def test_no_resume_starts_fresh(tokens_gen, tmp_path):
    tokens = tokens_gen(128, 2, 8)
    _run(tiny_model("llama", layers=2), tokens, WandaPruner(WandaConfig()), tmp_path / "ck")
    again = _run(tiny_model("llama", layers=2), tokens, WandaPruner(WandaConfig()), tmp_path / "ck")
    assert again.engine.resumed_at == 2 and again.engine.seconds_per_block == []
    fresh = _run(tiny_model("llama", layers=2), tokens, WandaPruner(WandaConfig()), tmp_path / "ck", resume=False)
    assert fresh.engine.resumed_at == 0 and len(fresh.engine.seconds_per_block) == 2
