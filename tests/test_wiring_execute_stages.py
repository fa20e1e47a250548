"""execute() on the tiny model (issue 21): which stages run for which pipeline, what each is
handed (cache key, export preflight's selection, preflight's outputs), what a failing stage
becomes, how long each took, the parameters a run records, and its MLflow run's tags."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers
import yaml

from tests.tiny_pipeline import document, write_text
from wanda_pipeline import __version__, stages
from wanda_pipeline.errors import DataError, PreflightError, RunError
from wanda_pipeline.pipelines_file import parse_document
from wanda_pipeline.plugins import discover
from wanda_pipeline.preflight import Output
from wanda_pipeline.run import execute


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


def pipeline(tiny_dir, text, **fields):
    doc = document(tiny_dir, text)
    doc["pipelines"]["p"].update(fields)
    return parse_document(yaml.safe_load(json.dumps(doc)), discover()).pipelines["p"]


class Keys:
    """A stage runner that keeps each stage's name and cache key."""

    def __init__(self):
        self.keys = {}

    def __call__(self, name, fn, *args, cache_key=None):
        self.keys[name] = cache_key
        return fn(*args)


RTN = {"name": "rtn", "bits": 8, "group_size": 32}


@pytest.mark.parametrize("fields, stages_run", [
    ({"pruner": {"name": "magnitude", "sparsity": 0.5}}, ["preflight", "load", "prune", "evaluate"]),
    ({"pruner": {"name": "magnitude", "sparsity": 0.5}, "reconstruct": {}},
     ["preflight", "load", "calibrate", "prune", "evaluate"]),  # reconstruction needs the inputs
    ({"pruner": {"name": "magnitude", "sparsity": 0.5}, "quantizer": {"name": "gptq", "bits": 4, "group_size": 32}},
     ["preflight", "load", "calibrate", "prune", "quantize", "evaluate"]),  # so does a calibrated quantizer
    ({"pruner": {"name": "magnitude", "sparsity": 0.5}, "quantizer": RTN}, ["preflight", "load", "prune", "quantize",
                                                                          "evaluate"]),
    ({"quantizer": RTN}, ["preflight", "load", "calibrate", "prune", "quantize", "evaluate"]),
])
def test_the_stages_that_run_and_the_cache_key_the_calibration_gets(tiny_dir, text, fields, stages_run):
    spec = pipeline(tiny_dir, text, **fields)
    keys = Keys()
    result = execute(spec, pipeline="p", run_stage=keys, progress=False)
    assert list(keys.keys) == stages_run == list(result.seconds)
    want = stages.calibration_key(spec.calibration, stages.load(spec.model))
    assert want.startswith("calib-") and keys.keys.pop("calibrate", want) == want
    assert set(keys.keys.values()) == {None}  # no stage that takes a model is cached


def test_the_export_preflight_checks_the_selected_linears_before_calibrating(tiny_dir, text, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("wanda_pipeline.export.compressed_tensors.preflight", lambda *a: seen.append(a))
    spec = pipeline(tiny_dir, text, quantizer=RTN, engine={"include": "self_attn", "exclude": "k_proj"},
                    save={"path": str(tmp_path / "o"), "format": "compressed-tensors"})
    keys = Keys()
    execute(spec, pipeline="p", run_stage=keys, progress=False)
    assert list(keys.keys)[:4] == ["preflight", "load", "preflight-export", "calibrate"]
    [(model, quantizer, include, exclude)] = seen
    assert isinstance(model, torch.nn.Module) and quantizer.config.bits == 8 and (include, exclude) == ("self_attn",
                                                                                                       "k_proj")


def test_preflight_is_handed_the_outputs_and_refuses_before_loading(tiny_dir, text, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("someone's file")
    keys = Keys()
    with pytest.raises(PreflightError, match=f"OutputError.* save folder {taken} exists and is not empty"):
        execute(pipeline(tiny_dir, text), pipeline="p", run_stage=keys, progress=False,
                outputs=[Output(str(taken), "save folder")])
    assert list(keys.keys) == ["preflight"]


@pytest.mark.parametrize("stage, exc, error, message", [
    ("calibrate", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), DataError,
     "stage 'calibrate': a text file is not UTF-8 ({text})"),
    ("prune", RuntimeError("odd"), RunError, "stage 'prune' failed: RuntimeError: odd"),
])
def test_a_library_error_in_a_stage_names_the_stage_and_its_input(tiny_dir, text, stage, exc, error, message):
    def runner(name, fn, *args, cache_key=None):
        if name == stage:
            raise exc
        return fn(*args)

    with pytest.raises(error) as err:
        execute(pipeline(tiny_dir, text), pipeline="p", run_stage=runner, progress=False)
    assert str(err.value).startswith(message.format(text=text))


def test_stage_times_add_up_to_no_more_than_the_run(tiny_dir, text):
    t0 = time.perf_counter()
    result = execute(pipeline(tiny_dir, text), pipeline="p", progress=False)
    wall = time.perf_counter() - t0
    assert all(s > 0 for s in result.seconds.values()) and sum(result.seconds.values()) <= wall
    assert {f"time_{k}_s" for k in result.seconds} <= set(result.metrics)


def test_the_parameters_a_run_records(tiny_dir, text):
    from wanda_pipeline.regional.config import ReconstructConfig

    spec = pipeline(tiny_dir, text, quantizer=RTN, reconstruct={"iterations": 1})
    result = execute(spec, pipeline="p", progress=False)
    loaded = stages.load(spec.model)
    windows = stages.calibrate(spec.calibration, loaded)
    rtn = discover().create("quantizer", "rtn", {"bits": 8, "group_size": 32})
    wanda = discover().create("pruner", "wanda", {"sparsity": 0.5})
    assert result.params == {
        "pipeline": "p",
        "model": {**spec.model.model_dump(), "fingerprint": loaded.info.fingerprint, "family": "llama",
                  "n_blocks": 2},
        "pruner": {"name": "wanda", **wanda.config.model_dump()},
        "target_sparsity": 0.5,
        "allocation": spec.allocation.model_dump(),
        "reconstruct": ReconstructConfig(iterations=1).model_dump(),
        "calibration": {**spec.calibration.model_dump(), "seqlen_used": 16, "windows_digest": windows.digest},
        "quantizer": {"name": "rtn", **rtn.config.model_dump()},
        "engine": spec.engine.model_dump(),
        "versions": {"wanda_pipeline": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    plain = execute(pipeline(tiny_dir, text, pruner={"name": "magnitude", "sparsity": 0.5}), progress=False).params
    assert (plain["reconstruct"], plain["quantizer"], plain["calibration"]["seqlen_used"],
            plain["calibration"]["windows_digest"]) == ("none", "none", None, None)


def test_a_sweep_point_is_a_nested_run_tagged_with_its_parent(tiny_dir, text):
    from tests.fake_registry import FakeClient, RecordingTracker

    spec = pipeline(tiny_dir, text, register={"enabled": False})
    tracker = RecordingTracker(FakeClient())
    result = execute(spec, pipeline="p", tracker=tracker, progress=False, parent_run_id="parent-run",
                     run_tags={"sweep": "s1"})
    assert tracker.logged["run"] == [("p", {"pipeline": "p", "sweep": "s1", "mlflow.parentRunId": "parent-run"})]
    assert tracker.logged["nested"] == [True] and result.mlflow_run_id == "run-under-test"
    execute(spec, pipeline="q", tracker=tracker, progress=False)
    assert tracker.logged["run"][-1] == ("q", {"pipeline": "q"}) and tracker.logged["nested"][-1] is False
    assert tracker.logged["log_params"][0] == (result.params,)  # what the run records is what it logged
    assert tracker.logged["log_dict"][0] == (spec.model_dump(by_alias=True), "pipeline_config.json")


def test_reconstruction_reaches_the_engine_and_changes_only_kept_weights(tiny_dir, text):
    plain = execute(pipeline(tiny_dir, text), pipeline="p", progress=False, run_stage=Keys())
    rebuilt = execute(pipeline(tiny_dir, text, reconstruct={"iterations": 1}), pipeline="p", progress=False)
    assert plain.weights_digest != rebuilt.weights_digest  # the block was optimised
    assert rebuilt.metrics["sparsity_total"] == plain.metrics["sparsity_total"]  # and no pruned weight revived


def test_a_streamed_run_stages_next_to_its_save_folder_or_in_the_cache_and_cleans_up(tiny_dir, text, monkeypatch,
                                                                                   tmp_path):
    from wanda_pipeline.settings import CACHE_DIR_ENV

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    seen = []
    real = stages.streaming_io
    monkeypatch.setattr(stages, "streaming_io", lambda model, save: seen.append(save) or real(model, save))
    out = tmp_path / "out"
    execute(pipeline(tiny_dir, text, engine={"stream": True}, save={"path": str(out)}), pipeline="p", progress=False)
    assert seen == [str(out)] and (out / "config.json").is_file() and not (tmp_path / "out.partial").exists()
    result = execute(pipeline(tiny_dir, text, engine={"stream": True}), pipeline="p", progress=False)
    assert seen[-1] is None and result.saved is None
    assert list((tmp_path / "cache" / "streamed").iterdir()) == []  # the staged shards are removed after the run


def test_what_a_quantized_run_reports_logs_and_saves(tiny_dir, text, tmp_path):
    from tests.fake_registry import FakeClient, RecordingTracker
    from wanda_pipeline.models import state_digest
    from wanda_pipeline.per_example import ARTIFACT, DENSE_ARTIFACT

    ppl = {"name": "perplexity", "path": str(text), "seqlen": 16, "windows": 2}
    out = tmp_path / "out"
    spec = pipeline(tiny_dir, text, quantizer=RTN, dense_baseline=True, evaluators=[ppl, {"name": "sparsity"}],
                    save={"path": str(out)}, register={"enabled": False})
    tracker = RecordingTracker(FakeClient())
    result = execute(spec, pipeline="p", tracker=tracker, progress=False)
    m = result.metrics
    assert {"quant_bits_per_weight", "quant_model_bytes", "quant_dense_model_bytes", "quant_zeros_kept",
            "quant_seconds"} <= set(m) and m["quant_bits_per_weight"] > 8 and m["quant_zeros_kept"] > 0
    assert m["quant_model_bytes"] < m["quant_dense_model_bytes"]
    key = next(k for k in result.dense if k.startswith("ppl_") and k.count("_") == 1)
    assert [k for k in m if k.endswith("_vs_dense")] == [f"{key}_vs_dense"]  # no ratio of two intervals
    assert not any(k.startswith("sparsity_block_") for k in m) and set(result.protocols) == {"perplexity",
                                                                                               "sparsity"}
    assert {"time_preflight_s", "time_evaluate_dense_s", "time_quantize_s"} <= set(m) and m["peak_rss_bytes"] > 0
    assert result.weights_digest == state_digest(stages.load(spec.model.model_copy(update={"source": str(out)})).model)
    provenance = json.loads((out / "wanda_provenance.json").read_text())
    assert provenance["dense"] == result.dense and provenance["block_target_sparsity"] == result.block_targets
    logged = [a[0] for a in tracker.logged["log_metrics"]]
    blocks = {k: v for k, v in logged[0].items() if k.startswith("sparsity_block_")}
    assert sorted(blocks) == ["sparsity_block_000", "sparsity_block_001"]  # MLflow gets each block's sparsity
    assert {k: v for k, v in logged[0].items() if k not in blocks} == {
        k: v for k, v in m.items() if not k.startswith(("time_", "peak_rss"))}
    assert logged[-1] == {k: v for k, v in m.items() if k.startswith("time_") or k == "peak_rss_bytes"}
    assert {name for _, name in tracker.logged["log_dict"]} >= {ARTIFACT, DENSE_ARTIFACT}
    assert {"weights_digest": result.weights_digest} in [a[0] for a in tracker.logged["set_tags"]]


@pytest.mark.parametrize("fields, given, dense_run", [
    ({"dense_baseline": True}, None, False),  # only the sparsity report: nothing to compare
    ({"dense_baseline": True, "evaluators": "ppl"}, None, True),
    ({"dense_baseline": True, "evaluators": "ppl"}, {"ppl_x": 2.0}, False),  # a sweep hands its baseline in
    ({"dense_baseline": False, "evaluators": "ppl"}, None, False),
])
def test_the_dense_baseline_runs_only_when_asked_needed_and_not_given(tiny_dir, text, fields, given, dense_run):
    if fields.get("evaluators") == "ppl":
        fields = {**fields, "evaluators": [{"name": "perplexity", "path": str(text), "seqlen": 16, "windows": 2}]}
    keys = Keys()
    result = execute(pipeline(tiny_dir, text, **fields), pipeline="p", run_stage=keys, progress=False,
                     dense_metrics=given)
    assert ("evaluate-dense" in keys.keys) is dense_run
    if given:
        assert result.dense == given
