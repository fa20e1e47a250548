"""Weights against config.json, one row per architecture: preflight's verdict from the
safetensors headers on a meta skeleton must be transformers' own verdict at load
(``output_loading_info``), and the load refuses what preflight refuses. Tiny random models,
saved here; each is also given a config.json with one block more or one fewer."""

from __future__ import annotations

import json
import shutil

import pytest
from test_engine_architectures import ARCHS, build

from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.errors import DataError
from wanda_pipeline.modelcheck import model_problems
from wanda_pipeline.models import load_model
from wanda_pipeline.sourcecheck import check_model

LAYER_KEYS = ("num_hidden_layers", "n_layer")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("coverage")
    out = {}
    for arch in ARCHS:
        build(arch).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def with_layers(folder, tmp_path, delta: int):
    bad = tmp_path / f"{folder.name}-{delta:+d}"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    key = next(k for k in LAYER_KEYS if k in config)
    config[key] += delta
    if "layer_types" in config:  # must list one type per layer
        config["layer_types"] = (config["layer_types"] * 2)[: config[key]]
    (bad / "config.json").write_text(json.dumps(config))
    return bad


def preflight_verdict(folder) -> list[str]:
    spec = PipelineSpec(model={"source": str(folder)}, pruner={"name": "wanda"})
    facts, problems = check_model(spec.model)
    assert problems == []
    return [str(p) for p in model_problems(spec, facts)]


def transformers_verdict(folder) -> bool:
    """The reference: does transformers itself report keys it could not match?"""
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return bool(info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_preflight_agrees_with_transformers_on_each_architecture(arch, saved, tmp_path):
    good = saved[arch]
    assert preflight_verdict(good) == [] and not transformers_verdict(good)
    for delta, words in ((+1, "initialise them randomly"), (-1, "would drop them")):
        bad = with_layers(good, tmp_path, delta)
        found = preflight_verdict(bad)
        assert transformers_verdict(bad), "the reference must see the mismatch too"
        assert len(found) == 1 and words in found[0] and "decoder blocks" in found[0], found


@pytest.mark.parametrize("delta", [+1, -1])
@pytest.mark.parametrize("stream", [False, True])
def test_the_load_refuses_weights_that_do_not_fit(saved, tmp_path, delta, stream, smollm2_tokenizer):
    """Again at load: a caller that skipped preflight still never gets random or dropped blocks."""
    bad = with_layers(saved["llama"], tmp_path, delta)
    smollm2_tokenizer.save_pretrained(bad)  # load_model reads the tokenizer first
    with pytest.raises(DataError, match="its weights do not match its config.json"):
        load_model(str(bad), stream=stream)


def test_the_prune_stage_refuses_a_selection_of_nothing(tiny_dir):
    """Preflight checks include/exclude on a local config; a hub model's config is only there after
    the load, so the prune stage checks again before it saves the dense model as pruned."""
    from wanda_pipeline import stages
    from wanda_pipeline.errors import ConfigError
    from wanda_pipeline.plugins import discover

    spec = PipelineSpec(model={"source": str(tiny_dir)}, pruner={"name": "magnitude"}, engine={"exclude": "."})
    loaded = stages.load(spec.model)
    pruner = discover().create("pruner", "magnitude", {})
    with pytest.raises(ConfigError, match="excludes all 7 linears"):
        stages.prune(loaded, None, pruner, spec)
