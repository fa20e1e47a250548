"""Wanda++ and reconstruction through prune_model and the pipeline spec: resume after a crash,
streaming, OWL, half precision, and the refusals made before anything is loaded."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from tests.conftest import needs_data
from wanda_pipeline.allocation import AllocationConfig
from wanda_pipeline.cli import main
from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.engine import LayerEngine
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.plugins import discover
from wanda_pipeline.pruners.magnitude import MagnitudePruner
from wanda_pipeline.pruners.wandapp import WandaPPConfig, WandaPPPruner
from wanda_pipeline.pruning import finish_streaming, prune_model, streaming_io
from wanda_pipeline.regional import optimise as regional_optimise
from wanda_pipeline.regional.config import ReconstructConfig
from wanda_pipeline.regional.visitor import block_level_problems
from wanda_pipeline.tiny_models import tiny_model

RO = {"iterations": 2, "samples": 2, "lr": 1e-4}


def wandapp(**over) -> WandaPPPruner:
    return WandaPPPruner(WandaPPConfig(**{"ro": RO, **over}))


def test_registered_as_wanda_plus_plus():
    assert discover().get("pruner", "wanda++") is WandaPPPruner


def test_a_resumed_run_equals_an_uninterrupted_one(tokens_gen, tmp_path, monkeypatch):
    tokens = tokens_gen(128, 3, 12, seed=5)
    full = tiny_model("llama", seed=5, layers=4)
    prune_model(full, tokens, wandapp(), LayerEngine(progress=False, batch_size=2))

    real, calls = regional_optimise.torch.autograd.grad, []

    def dies_in_block_two(*a, **kw):
        calls.append(1)
        if len(calls) > 2 * 2 + 2 * 2 * 2:  # block 0 and 1: 2 gradient + 2x2 RO backwards each
            raise RuntimeError("killed")
        return real(*a, **kw)

    crashed = tiny_model("llama", seed=5, layers=4)
    monkeypatch.setattr(torch.autograd, "grad", dies_in_block_two)
    with pytest.raises(Exception, match="killed"):
        prune_model(crashed, tokens, wandapp(), LayerEngine(progress=False, batch_size=2), checkpoint_dir=tmp_path)
    monkeypatch.undo()
    resumed = tiny_model("llama", seed=5, layers=4)
    outcome = prune_model(resumed, tokens, wandapp(), LayerEngine(progress=False, batch_size=2),
                          checkpoint_dir=tmp_path)
    assert outcome.engine.resumed_at == 2
    want = full.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert not torch.equal(want["model.layers.3.mlp.up_proj.weight"],
                           tiny_model("llama", seed=5, layers=4).state_dict()["model.layers.3.mlp.up_proj.weight"])


def test_streamed_wandapp_equals_in_memory(tokens_gen, tmp_path):
    tiny_model("llama", seed=6, layers=3).save_pretrained(tmp_path / "src", max_shard_size="200KB")
    tokens = tokens_gen(128, 2, 12, seed=6)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    prune_model(dense, tokens, wandapp(), LayerEngine(progress=False))

    from wanda_pipeline.engine import ShardSource
    from wanda_pipeline.engine.skeleton import build_skeleton

    skeleton = build_skeleton(tmp_path / "src", torch.float32)
    ShardSource(skeleton, tmp_path / "src")  # marks the skeleton as streamed from there
    io = streaming_io(skeleton, str(tmp_path / "out"))
    outcome = prune_model(skeleton, tokens, wandapp(), LayerEngine(progress=False), source=io[0], sink=io[1])
    finish_streaming(skeleton, io, outcome)
    written = AutoModelForCausalLM.from_pretrained(outcome.streamed_to).state_dict()
    expected = dense.state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_owl_ratios_reach_each_block(tokens_gen):
    model = tiny_model("llama", seed=7, layers=3)
    alloc = AllocationConfig(method="owl", owl_m=3, owl_lambda=0.08)
    outcome = prune_model(model, tokens_gen(128, 2, 12, seed=7), wandapp(sparsity=0.6), LayerEngine(progress=False),
                          alloc)
    assert len(set(outcome.block_ratios)) > 1
    for ratio, block in zip(outcome.block_ratios, find_blocks(model)[1], strict=True):
        for lin in find_linears(block).values():
            w = linear_weight_view(lin)
            assert bool(((w == 0).sum(1) == int(w.shape[1] * ratio)).all())


@pytest.mark.parametrize("dtype, lr", [(torch.bfloat16, 1e-4), (torch.float16, 1e-5)])
def test_half_precision_blocks_update_through_float32(dtype, lr, tokens_gen):
    """Adam steps of about ``lr``, below half the spacing of the dtype for every |w| >= 2^-5,
    so a step taken in the block's own dtype would round away; the float32 masters accumulate
    them. The block stays in its dtype and pruned weights stay zero."""
    model = tiny_model("llama", seed=8, layers=2).to(dtype)
    dense = copy.deepcopy(model)
    assert lr < 2 ** -5 * torch.finfo(dtype).eps / 2  # half the spacing just above 2^-5
    cfg = ReconstructConfig(iterations=10, samples=4, lr=lr, optimizer="adam")
    prune_model(model, tokens_gen(128, 4, 12, seed=8), MagnitudePruner(), LayerEngine(progress=False),
                reconstruct=cfg)
    moved = 0
    for (name, got), want in zip(model.named_parameters(), dense.parameters(), strict=True):
        assert got.dtype == dtype
        if name.endswith("proj.weight"):
            assert float((got == 0).float().mean()) >= 0.5
            big = (want.abs() >= 2 ** -5) & (got != 0)
            moved += int((got != want)[big].sum())
    assert moved > 0


def test_reconstruct_in_pipelines_yaml_is_strict():
    base = {"model": {"source": "x"}, "pruner": {"name": "wanda"}}
    spec = PipelineSpec(**base, reconstruct={"iterations": 5, "lr": 1e-5})
    assert spec.reconstruct == ReconstructConfig(iterations=5, lr=1e-5)
    assert PipelineSpec(**base).reconstruct is None
    with pytest.raises(ValidationError, match="iteratons"):
        PipelineSpec(**base, reconstruct={"iteratons": 5})
    with pytest.raises(ValidationError, match="engine.passes: 2"):
        PipelineSpec(**base, reconstruct={}, engine={"passes": 1})


def test_block_level_problems_are_named_before_loading():
    assert block_level_problems(MagnitudePruner(), ReconstructConfig(), 2) == []
    assert block_level_problems(MagnitudePruner(), None, 1) == []
    [one_pass] = block_level_problems(wandapp(), None, 1, "wanda++")
    assert "wanda++" in str(one_pass) and "passes: 2" in str(one_pass)
    [twice] = block_level_problems(wandapp(), ReconstructConfig(), 2, "wanda++")
    assert "`ro`" in str(twice) and "reconstruct" in str(twice)


@needs_data
def test_the_cli_refuses_one_pass_block_level_runs_before_loading(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["prune", "--model", str(tiny_dir), "--prune_method", "wanda++", "--passes", "1", "--nsamples", "2",
                 "--seqlen", "64", "--eval-windows", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "pruner 'wanda++' works on whole blocks" in err and "engine.passes: 2" in err
    assert "[stage] load" not in err and "Traceback" not in err
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"p": {
        "model": {"source": str(tiny_dir)}, "pruner": {"name": "magnitude"}, "engine": {"passes": 1},
        "reconstruct": {"iterations": 5}}}}))
    assert main(["validate", str(path)]) == 2
    assert "reconstruct works on whole blocks" in capsys.readouterr().err


def test_magnitude_plus_reconstruction_is_one_line_of_a_pipeline(tiny_dir, tmp_path):
    """A pruner that needs no statistics still gets calibration windows when `reconstruct` is set."""
    from wanda_pipeline.run import execute

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i} of some calibration text about blocks and masks" for i in range(50)))
    spec = PipelineSpec(model={"source": str(tiny_dir)}, pruner={"name": "magnitude", "sparsity": 0.5},
                        calibration={"source": str(text), "nsamples": 2, "seqlen": 16},
                        reconstruct={"iterations": 1, "samples": 2, "lr": 1e-4}, dense_baseline=False,
                        register={"enabled": False}, evaluators=[{"name": "sparsity"}])
    result = execute(spec, pipeline="magnitude-reconstruct", progress=False)
    assert "calibrate" in result.seconds
    assert result.params["reconstruct"] == ReconstructConfig(iterations=1, samples=2, lr=1e-4).model_dump()
    assert result.metrics["counter_reconstruct_steps"] == 2 * 2  # 2 blocks x 2 batches of one sample
    assert abs(result.metrics["sparsity_total"] - 0.5) < 0.01


@pytest.mark.parametrize("name", ["wanda", "magnitude", "ria"])
def test_any_mask_only_pruner_takes_reconstruction(name, tokens_gen):
    """Block 0 keeps the pruner's own mask (its inputs are the same either way); its kept weights move."""
    tokens = tokens_gen(128, 2, 12, seed=9)
    plain, rebuilt = tiny_model("llama", seed=9, layers=2), tiny_model("llama", seed=9, layers=2)
    make = lambda: discover().create("pruner", name, {"sparsity": 0.5})  # noqa: E731
    prune_model(plain, tokens, make(), LayerEngine(progress=False))
    prune_model(rebuilt, tokens, make(), LayerEngine(progress=False), reconstruct=ReconstructConfig(**RO))
    for (key, a), b in zip(plain.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        if "layers.0." in key and key.endswith("proj.weight"):
            assert torch.equal(a == 0, b == 0) and not torch.equal(a, b), key


def test_a_checkpoint_of_other_reconstruction_options_is_refused(tokens_gen, tmp_path):
    from wanda_pipeline.errors import ConfigError

    tokens = tokens_gen(128, 2, 8, seed=10)
    run = lambda cfg: prune_model(tiny_model("llama", seed=10, layers=2), tokens, MagnitudePruner(),  # noqa: E731
                                  LayerEngine(progress=False), checkpoint_dir=tmp_path, reconstruct=cfg)
    run(ReconstructConfig(**RO))
    with pytest.raises(ConfigError, match="differs in: reconstruct"):
        run(ReconstructConfig(**{**RO, "lr": 1e-3}))
