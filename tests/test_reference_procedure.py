"""The product's pruning (engine + Wanda pruner, reference-exact settings) against the
paper code's procedure in bench/reference_procedure.py: the same masks, the same weights.

This pins reference-exactness through engine rewrites: whatever the engine does to go
faster, with its default (reference-exact) settings it must prune what the paper code prunes.
"""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.pruners.wanda import WandaConfig, WandaPruner
from wanda_pipeline.pruning import prune_model
from wanda_pipeline.tiny_models import tiny_model

_spec = importlib.util.spec_from_file_location(
    "reference_procedure", Path(__file__).resolve().parents[1] / "bench" / "reference_procedure.py"
)
reference = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = reference  # dataclasses look their module up there
_spec.loader.exec_module(reference)


def linear_weights(model):
    _, blocks = find_blocks(model)
    return {(b, name): linear_weight_view(lin) for b, block in enumerate(blocks)
            for name, lin in find_linears(block).items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_engine_masks_equal_reference_procedure(family, tokens_gen):
    base = tiny_model(family, seed=4, layers=3)
    tokens = tokens_gen(base.config.vocab_size, 6, 24, seed=4)
    for pattern, nm in [("unstructured", None), ("2:4", (2, 4))]:
        model, twin = copy.deepcopy(base), copy.deepcopy(base)
        ref = reference.reference_prune(twin, tokens, sparsity=0.5, nm=nm)
        pruner = WandaPruner(WandaConfig(sparsity=0.5, pattern=pattern))
        prune_model(model, tokens, pruner, LayerEngine(progress=False))

        ours, theirs = linear_weights(model), linear_weights(twin)
        assert set(ref.masks) == set(ours) and len(ours) >= 3 * 4
        for key, mask in ref.masks.items():
            assert int(mask.sum()) == mask.shape[0] * (mask.shape[1] // 2), (pattern, key)
            assert torch.equal(ours[key] == 0, mask), (pattern, key)
            assert torch.equal(ours[key], theirs[key]), (pattern, key)
        assert len(ref.seconds_per_block) == 3 and ref.seconds >= ref.capture_seconds > 0


def test_reference_reuses_the_last_captured_arguments(tokens_gen):
    """Block 0 of the reference sees what the full model feeds it (the Catcher is transparent)."""
    model = tiny_model("llama", seed=5, layers=2)
    tokens = tokens_gen(model.config.vocab_size, 3, 16, seed=5)
    _, blocks = find_blocks(model)
    seen = []
    handle = blocks[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for j in range(3):
            model(tokens[j : j + 1], use_cache=False)
    handle.remove()
    # With zero sparsity the reference prunes nothing, so its block-1 inputs are the dense ones.
    grabbed = []
    handle = blocks[1].register_forward_pre_hook(lambda _m, args: grabbed.append(args[0].detach().clone()))
    reference.reference_prune(model, tokens, sparsity=0.0)
    handle.remove()
    assert len(grabbed) == 6  # two passes over three sequences
    for j in range(3):
        torch.testing.assert_close(grabbed[j], seen[j], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grabbed[3 + j], seen[j], rtol=1e-5, atol=1e-6)


_paper_spec = importlib.util.spec_from_file_location(
    "paper_code", Path(__file__).resolve().parents[1] / "bench" / "paper_code.py")
paper_code = importlib.util.module_from_spec(_paper_spec)
_paper_spec.loader.exec_module(paper_code)


def test_paper_code_dir_that_is_not_a_checkout_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(paper_code.ENV, str(tmp_path))
    with pytest.raises(SystemExit, match="no lib/prune.py there.*locuslab/wanda"):
        paper_code.reference_dir()
    monkeypatch.delenv(paper_code.ENV)
    assert paper_code.reference_dir() is None


@pytest.mark.skipif(not paper_code.reference_dir(), reason="set WANDA_REFERENCE_DIR to a locuslab/wanda checkout")
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reference_procedure_equals_the_paper_code(nm, tokens_gen):
    """The in-repo procedure prunes exactly what locuslab/wanda's prune_wanda prunes (patched to run here)."""
    model = tiny_model("llama", seed=5, layers=3)
    twin = copy.deepcopy(model)
    tokens = tokens_gen(model.config.vocab_size, 6, 24, seed=5)
    paper_code.paper_prune(model, tokens, 0.5, nm, paper_code.reference_dir())
    reference.reference_prune(twin, tokens, 0.5, nm, keep_masks=False)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)
