"""Saving/reloading, the bitmask format, RTN quantisation and the quantize stage's zero check."""

import pytest
import torch

from wanda_pipeline import stages
from wanda_pipeline.config import EngineSpec
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.errors import RunError
from wanda_pipeline.models import find_blocks, find_linears
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.quantizers.rtn import RTNConfig, RTNQuantizer, quantize_rtn
from wanda_pipeline.saving import (
    folder_bytes,
    load_sparse,
    pack_sparse,
    read_provenance,
    save_model,
    save_sparse,
    unpack_sparse,
)
from wanda_pipeline.tiny_models import tiny_model


def pruned_tiny(smollm2_tokenizer, tokens_gen, seed=0):
    model = tiny_model("llama", seed=seed, vocab_size=len(smollm2_tokenizer))
    tokens = tokens_gen(len(smollm2_tokenizer), 4, 16, seed)
    prune_model(model, tokens, WandaPruner(WandaConfig(sparsity=0.5)), LayerEngine(progress=False))
    return model


def test_pack_unpack_roundtrip():
    w = torch.randn(7, 13)
    w[w.abs() < 0.6] = 0
    packed = pack_sparse(w)
    assert packed["values"].numel() == int((w != 0).sum())
    assert packed["bitmask"].numel() == (w.numel() + 7) // 8
    assert torch.equal(unpack_sparse(packed["values"], packed["bitmask"], (7, 13)), w)


@pytest.mark.parametrize("compressed", [False, True])
def test_reload_gives_identical_weights(tmp_path, smollm2_tokenizer, tokens_gen, compressed):
    from wanda_pipeline.mlflow_model import load_folder

    model = pruned_tiny(smollm2_tokenizer, tokens_gen)
    saver = save_sparse if compressed else save_model
    saver(model, smollm2_tokenizer, tmp_path, {"sparsity_total": 0.5})
    again, tok = load_folder(tmp_path) if not compressed else load_sparse(tmp_path)
    original = model.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert read_provenance(tmp_path)["sparsity_total"] == 0.5
    assert len(tok) == len(smollm2_tokenizer)


def test_compressed_folder_is_smaller_than_dense(tmp_path, smollm2_tokenizer, tokens_gen):
    model = pruned_tiny(smollm2_tokenizer, tokens_gen)
    save_model(model, None, tmp_path / "dense", {})
    save_sparse(model, None, tmp_path / "sparse", {})
    assert (tmp_path / "sparse" / "sparse_weights.safetensors").exists()
    # Only the block linears are sparse; the (large) embedding stays dense, so the gain is modest here.
    assert folder_bytes(tmp_path / "sparse") < folder_bytes(tmp_path / "dense")


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_rtn_matches_written_out_formula(bits, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g)
    w[:, ::3] = 0
    got = quantize_rtn(w, bits, 8, symmetric)
    expected = torch.empty_like(w)
    for r in range(6):
        for c0 in range(0, 16, 8):
            grp = w[r, c0 : c0 + 8]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                scale = grp.abs().max() / qmax
                expected[r, c0 : c0 + 8] = torch.clamp(torch.round(grp / scale), -qmax - 1, qmax) * scale
            else:
                lo, hi = min(grp.min(), 0), max(grp.max(), 0)
                scale = (hi - lo) / (2**bits - 1)
                zero = torch.round(-lo / scale)
                expected[r, c0 : c0 + 8] = (torch.clamp(torch.round(grp / scale) + zero, 0, 2**bits - 1) - zero) * scale
    torch.testing.assert_close(got, expected)
    assert bool((got[w == 0] == 0).all())
    # One group of 256 distinct values collapses onto at most 2**bits levels.
    row = torch.randn(1, 256, generator=g)
    assert len(torch.unique(row)) == 256
    assert len(torch.unique(quantize_rtn(row, bits, 256, symmetric))) <= 2**bits


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_stage_keeps_every_pruned_zero(smollm2_tokenizer, tokens_gen, bits):
    model = pruned_tiny(smollm2_tokenizer, tokens_gen)
    _, blocks = find_blocks(model)
    zeros_before = {(b, n): (lin.weight == 0).clone() for b, blk in enumerate(blocks)
                    for n, lin in find_linears(blk).items()}
    report = stages.quantize(model, RTNQuantizer(RTNConfig(bits=bits, group_size=16, symmetric=False)), EngineSpec())
    for (b, n), zero in zeros_before.items():
        w = dict(find_linears(blocks[b]))[n].weight
        assert bool((w[zero] == 0).all())
    assert report.zeros_after >= report.zeros_before > 0
    assert report.bits_per_weight == pytest.approx(bits + 2 * 16 / 16)
    assert report.model_bytes < report.dense_model_bytes


def test_quantize_stage_catches_a_mask_unaware_quantizer(smollm2_tokenizer, tokens_gen):
    class Shifty(RTNQuantizer):
        def quantize_weight(self, weight):
            return weight + 1e-3  # moves zeros, like a quantizer with a non-zero zero point

    model = pruned_tiny(smollm2_tokenizer, tokens_gen)
    with pytest.raises(RunError, match="pruned zeros"):
        stages.quantize(model, Shifty(), EngineSpec())
