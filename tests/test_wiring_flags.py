"""Flags and pipelines.yaml options reach the engine: each lands in the spec and in the engine
or plugin that uses it, and changing it changes the pruned tiny model exactly where it should.
Defaults are pinned, so a changed default fails here. (execute() itself: test_wiring_execute.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_pipeline import run_yaml, write_text
from wanda_pipeline import stages
from wanda_pipeline.cli import build_parser
from wanda_pipeline.cli_prune import prune_spec
from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.plugins import discover


def flags(*argv: str) -> PipelineSpec:
    return prune_spec(build_parser().parse_args(["prune", *argv]))


def dig(spec: PipelineSpec, path: str):
    node = spec.model_dump(by_alias=True)
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


# (flags, spec path, value there)
CLI = [
    (["--model", "/m"], "model.source", "/m"),
    (["--seed", "7"], "calibration.seed", 7),
    (["--nsamples", "5"], "calibration.nsamples", 5),
    (["--seqlen", "64"], "calibration.seqlen", 64),
    (["--seqlen", "64"], "evaluators.0.seqlen", 64),        # the perplexity window follows it ...
    (["--seqlen", "64", "--eval-seqlen", "32"], "evaluators.0.seqlen", 32),  # ... unless given
    (["--eval-windows", "3"], "evaluators.0.windows", 3),
    (["--eval-path", "/w.txt"], "evaluators.0.path", "/w.txt"),
    (["--eval-windows", "0"], "evaluators", [{"name": "sparsity"}]),
    (["--calibration", "wikitext2"], "calibration.source", "wikitext2"),
    (["--calibration-path", "/c.jsonl"], "calibration.path", "/c.jsonl"),
    (["--sparsity_ratio", "0.3"], "pruner.sparsity", 0.3),
    (["--sparsity_type", "2:4"], "pruner.pattern", "2:4"),
    (["--prune_method", "magnitude"], "pruner.name", "magnitude"),
    (["--use_variant"], "pruner.use_variant", True),
    (["--dtype", "bfloat16"], "model.dtype", "bfloat16"),
    (["--device", "cuda:1"], "engine.device", "cuda:1"),
    (["--batch-size", "4"], "engine.batch_size", 4),
    (["--batch-size", "auto"], "engine.batch_size", "auto"),
    (["--passes", "1"], "engine.passes", 1),
    (["--threads", "2"], "engine.threads", 2),
    (["--include", "q_proj"], "engine.include", "q_proj"),
    (["--exclude", "down_proj"], "engine.exclude", "down_proj"),
    (["--checkpoint_dir", "/ck"], "engine.checkpoint_dir", "/ck"),
    (["--no_resume"], "engine.resume", False),
    (["--keep_checkpoints"], "engine.keep_checkpoints", True),
    (["--stream"], "engine.stream", True),
    (["--save_model", "/o", "--save_format", "compressed-tensors", "--overwrite", "--quantizer", "rtn"], "save",
     {"path": "/o", "format": "compressed-tensors", "overwrite": True}),
    (["--save_model", "/o"], "save", {"path": "/o", "format": "hf", "overwrite": False}),
    (["--quantizer", "gptq", "--bits", "8", "--group_size", "64", "--quantizer_option", "act_order=false"],
     "quantizer", {"name": "gptq", "bits": 8, "group_size": 64, "act_order": False}),
    (["--tracking-uri", "sqlite:///x.db", "--experiment", "e"], "tracking", {"uri": "sqlite:///x.db",
                                                                             "experiment": "e"}),
]


@pytest.mark.parametrize("argv, path, value", CLI, ids=[" ".join(c[0]) for c in CLI])
def test_each_prune_flag_lands_in_the_spec_and_the_engine(argv, path, value):
    spec = flags(*argv)
    assert dig(spec, path) == value
    if path.startswith("engine.") and path.split(".")[1] in ("device", "batch_size", "passes", "threads", "include",
                                                             "exclude"):
        engine = stages.make_engine(spec.engine, progress=False)
        want = torch.device(value) if path == "engine.device" else value
        assert getattr(engine, path.split(".")[1]) == want
    if path == "quantizer":  # the options reach the plugin's config
        quantizer = discover().create("quantizer", spec.quantizer.name, spec.quantizer.options())
        assert {k: getattr(quantizer.config, k) for k in value if k != "name"} == {k: v for k, v in value.items()
                                                                                   if k != "name"}
    if path.startswith("pruner."):
        pruner = discover().create("pruner", spec.pruner.name, spec.pruner.options())
        assert getattr(pruner.config, path.split(".")[1], spec.pruner.name) == value


@pytest.mark.parametrize("argv, message", [
    (["--passes", "3"], "argument --passes: invalid choice: 3 (choose from 1, 2)"),
    (["--batch-size", "x"], "argument --batch-size: expected a positive integer or 'auto', got 'x'"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
])
def test_bad_flag_values_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        flags(*argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_bad_flag_combinations_are_config_errors():
    from wanda_pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        flags("--stream", "--calibration", "self")
    assert str(err.value) == "--calibration self needs the whole model in memory; it cannot be combined with --stream"
    with pytest.raises(ConfigError) as err:
        flags("--nsamples", "0")
    assert str(err.value).startswith("invalid flags: 1 validation error for PipelineSpec\ncalibration.nsamples")
    assert flags("--stream").engine.stream and flags("--calibration", "self").calibration.source == "self"


def test_the_prune_flags_defaults_are_pinned():
    assert flags().model_dump(by_alias=True, mode="json") == {
        "description": "", "model": {"source": "smollm2-135m", "dtype": "float32", "revision": None,
                                     "trust_remote_code": False},
        "calibration": {"source": "c4", "path": None, "nsamples": 128, "seqlen": None, "seed": 0},
        "pruner": {"name": "wanda", "pattern": "unstructured"},
        "allocation": {"method": "uniform", "ratios": None, "owl_m": 5.0, "owl_lambda": 0.08},
        "engine": {"device": "cpu", "batch_size": 1, "passes": 2, "threads": None, "offload_activations": True,
                   "include": None, "exclude": None, "checkpoint_dir": None, "resume": True,
                   "keep_checkpoints": False, "stream": False},
        "reconstruct": None, "quantizer": None, "evaluators": [{"name": "perplexity"}, {"name": "sparsity"}],
        "dense_baseline": False,
        "register": {"enabled": False, "model_name": None, "alias": "champion",
                     "gates": {"max_ppl_ratio": None, "min_zeroshot_ratio": None, "min_sparsity": None,
                               "beat_champion": None, "lower_is_better": None, "confidence": 0.95,
                               "bound": "interval"}, "compressed": True, "format": None},
        "tracking": {"uri": None, "experiment": "wanda-pipeline"}, "schedule": None, "save": None}


PLUGIN_DEFAULTS = {
    ("evaluator", "latency"): {"device": "cpu", "prompt_tokens": 128, "decode_tokens": 32, "batch_size": 1,
                               "warmup": 1, "repeats": 3, "sparse_kernel": "auto", "force_cutlass": False,
                               "seed": 0},
    ("evaluator", "perplexity"): {"dataset": "wikitext2", "path": None, "seqlen": None, "windows": None,
                                  "batch_size": 1, "device": "cpu", "stream_activation_bytes": 1 << 30},
    ("evaluator", "sparsity"): {"include": None, "exclude": None},
    ("evaluator", "zeroshot"): {"tasks": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                                          "openbookqa"], "source": "local", "data_dir": None, "limit": None,
                                "batch_size": 8, "seed": 1234, "device": "cpu"},
    ("pruner", "magnitude"): {"sparsity": 0.5, "pattern": "unstructured", "group": "layer"},
    ("pruner", "ria"): {"sparsity": 0.5, "pattern": "unstructured", "a": 0.5, "group": "output"},
    ("pruner", "sparsegpt"): {"sparsity": 0.5, "pattern": "unstructured", "percdamp": 0.01, "blocksize": 128,
                              "max_damp_retries": 4},
    ("pruner", "wanda"): {"sparsity": 0.5, "pattern": "unstructured", "group": "output", "use_variant": False,
                          "variant_tol": 0.001},
    ("pruner", "wanda++"): {"sparsity": 0.5, "pattern": "unstructured", "alpha": 100.0, "gradient": "rms",
                            "gradient_samples": 8,
                            "ro": {"iterations": 1, "samples": 32, "lr": 1e-3, "optimizer": "adam", "seed": 0}},
    ("quantizer", "gptq"): {"bits": 4, "group_size": 128, "symmetric": True, "scale_bits": 16, "percdamp": 0.01,
                            "blocksize": 128, "act_order": True, "max_damp_retries": 4},
    ("quantizer", "rtn"): {"bits": 8, "group_size": 128, "symmetric": True, "scale_bits": 16},
}


def test_every_plugins_default_options_are_pinned():
    registry = discover()
    found = {(i.kind, i.name) for i in registry.plugins.values()}
    assert found == set(PLUGIN_DEFAULTS), "a plugin was added or removed: pin its defaults here"
    for (kind, name), want in PLUGIN_DEFAULTS.items():
        assert registry.create(kind, name, {}).config.model_dump(mode="json") == want, name


# --- pipelines.yaml options, through execute() on the tiny model -----------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


# (override, where to find it after the run, the value there, does the pruned model change?)
YAML = [
    ("calibration.seed=1", lambda s: s.args["calibrate"][0].seed, 1, True),
    ("calibration.nsamples=2", lambda s: tuple(s.results["calibrate"].tokens.shape), (2, 16), True),
    ("calibration.seqlen=8", lambda s: tuple(s.results["calibrate"].tokens.shape), (4, 8), True),
    ("pruner.sparsity=0.3", lambda s: s.args["prune"][2].config.sparsity, 0.3, True),
    ("pruner.pattern='2:4'", lambda s: s.args["prune"][2].config.pattern, "2:4", True),
    ("pruner.group=layer", lambda s: s.args["prune"][2].config.group, "layer", True),
    ("allocation.method=owl", lambda s: s.args["prune"][3].allocation.method, "owl", True),
    ("allocation={method: per_layer, ratios: {0: 0.2, 1: 0.7}}",
     lambda s: s.results["prune"].block_ratios, [0.2, 0.7], True),
    ("engine.include=q_proj", lambda s: s.engines[0].include, "q_proj", True),
    ("engine.exclude=down_proj", lambda s: s.engines[0].exclude, "down_proj", True),
    ("engine.passes=1", lambda s: s.engines[0].passes, 1, True),
    ("model.dtype=bfloat16", lambda s: next(s.results["load"].model.parameters()).dtype, torch.bfloat16, True),
    ("engine.batch_size=2", lambda s: s.engines[0].batch_size, 2, None),  # may round differently
    ("engine.device=cpu", lambda s: s.engines[0].device, torch.device("cpu"), False),
    ("engine.threads=1", lambda s: s.engines[0].threads, 1, False),
    ("engine.offload_activations=false", lambda s: s.engines[0].offload_activations, False, False),
    ("engine.stream=true", lambda s: bool(s.results["prune"].streamed_to), True, None),  # compared below
]


@pytest.fixture(scope="module")
def baseline(tiny_dir, text):
    with pytest.MonkeyPatch.context() as mp:
        return run_yaml(tiny_dir, text, mp, [])[2].weights_digest


@pytest.mark.parametrize("override, where, value, changes", YAML, ids=[c[0] for c in YAML])
def test_each_pipelines_option_reaches_the_engine_and_changes_the_model_where_it_should(
        tiny_dir, text, monkeypatch, baseline, override, where, value, changes):
    spec, spy, result = run_yaml(tiny_dir, text, monkeypatch, [override])
    assert where(spy) == value
    assert spy.args["prune"][3] is spec and len(spy.engines) == 1
    if changes is not None:
        assert (result.weights_digest != baseline) is changes, override
