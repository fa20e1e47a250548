"""The run path's small pieces (issue 21): what a failing stage names, what the result reports,
which formats the export preflight checks, that an error without a tracker still propagates,
and what the registered model folder is written with."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from tests.tiny_pipeline import document, write_text
from wanda_pipeline import run
from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.errors import PluginError
from wanda_pipeline.pipelines_file import parse_document
from wanda_pipeline.plugins import discover


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


def test_a_failing_stage_names_the_sources_and_paths_it_was_given():
    args = (SimpleNamespace(source="hub/model"), SimpleNamespace(path="/data/c.txt", source="hub/model"),
            SimpleNamespace(path=""), SimpleNamespace(path=3), "plain")
    assert run._inputs(args) == "hub/model, /data/c.txt"
    assert run._inputs((SimpleNamespace(), 1)) is None


def test_the_result_lists_its_stages_in_the_order_they_ran():
    result = run.RunResult(pipeline="p", seconds={"load": 1.0, "prune": 2.0})
    out = result.as_dict()
    assert out["stages"] == ["load", "prune"] and out["pipeline"] == "p" and out["seconds"] == result.seconds


@pytest.mark.parametrize("register, save, tracker, want", [
    ({"enabled": False}, None, None, set()),
    ({"format": "compressed-tensors"}, None, object(), {"compressed-tensors"}),
    ({"format": "compressed-tensors"}, None, None, set()),  # no tracker: nothing is logged
    ({}, {"path": "/o", "format": "compressed-tensors"}, None, {"compressed-tensors"}),
    ({"compressed": True}, {"path": "/o"}, object(), {"bitmask-v1", "hf"}),
])
def test_the_export_preflight_sees_every_format_the_run_will_write(register, save, tracker, want):
    spec = PipelineSpec(model={"source": "m"}, pruner={"name": "wanda"}, register=register, save=save)
    assert run._formats(spec, spec.save, tracker) == want


def test_without_a_tracker_a_failing_stage_still_raises(tiny_dir, text, monkeypatch):
    class Broken:
        def evaluate(self, model, tokenizer):
            raise ValueError("boom")

    spec = parse_document(yaml.safe_load(json.dumps(document(tiny_dir, text))), discover()).pipelines["p"]
    real = run.stages.evaluate
    monkeypatch.setattr(run.stages, "evaluate", lambda m, t, evaluators: real(m, t, {"broken": Broken()}))
    with pytest.raises(PluginError, match="evaluator 'broken' crashed: ValueError: boom"):
        run.execute(spec, pipeline="p", progress=False)


def test_the_registered_folder_is_written_with_the_runs_provenance_and_quantizer(tiny_dir, text):
    from tests.fake_registry import FakeClient, RecordingTracker

    doc = document(tiny_dir, text)
    doc["pipelines"]["p"]["register"] = {"model_name": "m", "format": "compressed-tensors", "gates": {}}
    doc["pipelines"]["p"]["quantizer"] = {"name": "rtn", "bits": 8, "group_size": 32}
    spec = parse_document(yaml.safe_load(json.dumps(doc)), discover()).pipelines["p"]
    tracker = RecordingTracker(FakeClient())
    result = run.execute(spec, pipeline="p", tracker=tracker, progress=False)
    assert tracker.logged["model_metadata"] == [{"sparsity": result.metrics["sparsity_total"], "pipeline": "p",
                                                 "format": "compressed-tensors"}]
    [provenance] = tracker.logged["wanda_provenance.json"]
    assert provenance["pruner"]["name"] == "wanda" and provenance["quantizer"]["bits"] == 8
    assert provenance["metrics"]["sparsity_total"] == result.metrics["sparsity_total"]
    [config] = tracker.logged["config.json"]
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert [name for name, _ in tracker.logged["run"]] == ["p"]


def test_the_promotion_policy_gets_the_runs_name_dense_baseline_target_and_examples(tiny_dir, text, monkeypatch):
    import torch
    import transformers

    from tests.fake_registry import FakeClient, RecordingTracker
    from wanda_pipeline import __version__

    seen = {}

    def policy(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return SimpleNamespace(as_dict=lambda: {"decided": "here"})

    monkeypatch.setattr("wanda_pipeline.tracking.promotion.register_and_promote", policy)
    doc = document(tiny_dir, text)
    ppl = {"name": "perplexity", "path": str(text), "seqlen": 16, "windows": 2}
    doc["pipelines"]["p"].update(pruner={"name": "wanda", "pattern": "2:4"}, dense_baseline=True,
                                 evaluators=[ppl, {"name": "sparsity"}], register={"gates": {}})
    spec = parse_document(yaml.safe_load(json.dumps(doc)), discover()).pipelines["p"]
    tracker = RecordingTracker(FakeClient())
    result = run.execute(spec, pipeline="p", tracker=tracker, progress=False)
    _, reg, pipeline, uri, metrics, dense, target, tags = seen["args"]
    assert (pipeline, uri, target, reg) == ("p", "models:/m-under-test", 0.5, spec.registration)
    assert metrics is result.metrics and dense == result.dense and any(k.startswith("ppl_") for k in dense)
    assert (tags["pipeline"], tags["pruner"], tags["pattern"]) == ("p", "wanda", "2:4")
    key = next(k for k in seen["kwargs"]["examples"] if k.startswith("ppl_"))
    assert len(seen["kwargs"]["examples"][key]["values"]) == 2  # this run's windows, for the paired gates
    assert seen["kwargs"]["dense_examples"] == result.dense_examples and key in result.dense_examples
    assert result.registration == {"decided": "here"} and result.tracking_uri == tracker.uri
    assert result.params["versions"] == {"wanda_pipeline": __version__, "torch": torch.__version__,
                                         "transformers": transformers.__version__}


def test_a_run_without_a_name_is_called_pipeline(tiny_dir, text):
    spec = parse_document(yaml.safe_load(json.dumps(document(tiny_dir, text))), discover()).pipelines["p"]
    result = run.execute(spec, progress=False)
    assert result.pipeline == "pipeline" == result.params["pipeline"] and result.tracking_uri is None
