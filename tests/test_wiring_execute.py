"""execute() on the tiny model: the checkpoint and stream options change nothing in the model, the
stages run in order with a dense baseline measured on the dense model, a tracker gets exactly what
is registered (and a registry error fails closed), and the prune command runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.tiny_pipeline import Spy, document, run_yaml, write_text
from wanda_pipeline import stages
from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.models import state_digest
from wanda_pipeline.pipelines_file import apply_overrides, parse_document
from wanda_pipeline.plugins import discover
from wanda_pipeline.run import execute


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture(scope="module")
def baseline(tiny_dir, text):
    with pytest.MonkeyPatch.context() as mp:
        return run_yaml(tiny_dir, text, mp, [])[2].weights_digest


def test_checkpoint_options_reach_the_engine_and_change_nothing_in_the_model(tiny_dir, text, monkeypatch, tmp_path,
                                                                            baseline):
    ck = tmp_path / "ck"
    over = [f"engine.checkpoint_dir={ck}", "engine.keep_checkpoints=true"]
    _, spy, result = run_yaml(tiny_dir, text, monkeypatch, over)
    assert result.weights_digest == baseline and spy.results["prune"].checkpoint_dir == str(ck)
    assert json.loads((ck / "manifest.json").read_text())["finished"] == 2  # kept
    _, spy, result = run_yaml(tiny_dir, text, monkeypatch, over)
    assert spy.results["prune"].engine.resumed_at == 2 and result.weights_digest == baseline  # resumed
    _, spy, result = run_yaml(tiny_dir, text, monkeypatch, [*over, "engine.resume=false"])
    assert spy.results["prune"].engine.resumed_at == 0 and result.weights_digest == baseline
    run_yaml(tiny_dir, text, monkeypatch, [f"engine.checkpoint_dir={ck}"])
    assert not ck.exists()  # not kept: removed after success


def test_a_streamed_run_writes_the_same_model(tiny_dir, text, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    saved = {}
    for stream in ("false", "true"):
        out = tmp_path / f"out-{stream}"
        run_yaml(tiny_dir, text, monkeypatch, [f"engine.stream={stream}", f"save={out}"])
        saved[stream] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert saved["true"].keys() == saved["false"].keys()
    assert all(torch.equal(saved["true"][k], saved["false"][k]) for k in saved["true"])


def test_execute_runs_the_stages_in_order_and_measures_the_dense_baseline_on_the_dense_model(
        tiny_dir, text, monkeypatch):
    from wanda_pipeline.evaluators.perplexity import PerplexityConfig, PerplexityEvaluator

    ppl = {"name": "perplexity", "path": str(text), "seqlen": 16, "windows": 2}
    over = [f"evaluators=[{json.dumps(ppl)}, {{name: sparsity}}]", "dense_baseline=true"]
    seen = {}
    spy = Spy(monkeypatch)

    def runner(name, fn, *args, cache_key=None):
        if name == "evaluate-dense":
            seen["digest"] = state_digest(args[0])
            seen["zeros"] = sum(int((p == 0).sum()) for p in args[0].parameters())
        return spy(name, fn, *args, cache_key=cache_key)

    doc = parse_document(yaml.safe_load(json.dumps(document(tiny_dir, text))), discover())
    result = execute(apply_overrides(doc.pipelines["p"], over), pipeline="p", run_stage=runner, progress=False)
    assert spy.names == ["preflight", "load", "calibrate", "evaluate-dense", "prune", "evaluate"]
    assert list(result.seconds) == spy.names
    fresh = stages.load(PipelineSpec(model={"source": str(tiny_dir)}, pruner={"name": "wanda"}).model)
    assert seen["digest"] == state_digest(fresh.model) and seen["zeros"] == 0
    assert set(spy.args["evaluate-dense"][2]) == {"perplexity"}  # sparsity is not a baseline metric
    key = next(k for k in result.dense if k.startswith("ppl_"))
    dense_ppl = PerplexityEvaluator(PerplexityConfig(**{k: v for k, v in ppl.items() if k != "name"})).evaluate(
        fresh.model, fresh.tokenizer).metrics[key]
    assert result.dense[key] == dense_ppl and all(k.startswith(key) for k in result.dense)
    assert result.metrics[key] != dense_ppl and result.metrics[f"{key}_vs_dense"] == result.metrics[key] / dense_ppl


def test_execute_with_a_tracker_registers_what_it_logged_and_fails_closed(tiny_dir, text, monkeypatch):
    from tests.fake_registry import FakeClient, RecordingTracker
    from wanda_pipeline.errors import TrackingError

    register = {"model_name": "m", "compressed": False,
                "gates": {"min_sparsity": 0.4}}
    doc = document(tiny_dir, text)
    doc["pipelines"]["p"]["register"] = register
    spec = parse_document(yaml.safe_load(json.dumps(doc)), discover()).pipelines["p"]
    client = FakeClient(champion={"sparsity_total": 0.1})  # v1 holds @champion at 10 % sparsity
    tracker = RecordingTracker(client)
    result = execute(spec, pipeline="p", tracker=tracker, progress=False)
    assert list(result.seconds)[-1] == "register" and result.model_uri == "models:/m-under-test"
    assert "model.safetensors" in tracker.model_files and "wanda_provenance.json" in tracker.model_files
    assert client.sources == {("m", "2"): "models:/m-under-test"} and client.aliases == {("m", "champion"): "2"}
    tags = client.versions[("m", "2")]
    assert (tags["pipeline"], tags["pruner"], tags["pattern"], tags["promoted"]) == ("p", "wanda", "unstructured",
                                                                                    "true")
    assert tags["sparsity"] == f"{result.metrics['sparsity_total']:.4f}" and float(tags["sparsity"]) > 0.4
    assert tags["metric.sparsity_total"] == f"{result.metrics['sparsity_total']:.6g}"
    assert result.registration == {"name": "m", "version": "2", "alias": "champion", "promoted": True,
                                   "gates": result.registration["gates"], "reason": "passed all gates"}

    client.faults["get_model_version_by_alias"] = TimeoutError("read timed out")
    with pytest.raises(TrackingError) as err:
        execute(spec, pipeline="p", tracker=RecordingTracker(client), progress=False)
    assert err.value.exit_code == 6 and str(err.value).startswith("m v3 registered but NOT promoted: ")
    assert client.aliases == {("m", "champion"): "2"} and client.versions[("m", "3")]["promoted"] == "false"


def test_the_prune_command_runs_the_stages_and_writes_its_log(tiny_dir, text, tmp_path, capsys):
    from wanda_pipeline.cli import main

    code = main(["prune", "--model", str(tiny_dir), "--calibration", str(text), "--nsamples", "2", "--seqlen", "16",
                 "--eval-windows", "0", "--sparsity_ratio", "0.3", "--save", str(tmp_path / "log")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [line.removeprefix("[stage] ") for line in err.splitlines() if line.startswith("[stage] ")] == [
        "preflight", "load", "calibrate", "prune", "evaluate"]
    sparsity = float(next(line for line in out.splitlines() if line.startswith("sparsity sanity check")).split()[-1])
    assert 0.27 <= sparsity <= 0.3  # 30 % per row, rounded down to whole weights (not the default 50 %)
    assert (tmp_path / "log" / "log_wanda.txt").read_text().splitlines() == [
        "method\tactual_sparsity\tppl_test", f"wanda\t{sparsity:.4f}\tnan"]


def test_the_save_stage_writes_provenance_and_the_quantized_format_over_an_old_folder(tiny_dir, text, monkeypatch,
                                                                                     tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous model")
    save = {"path": str(out), "format": "compressed-tensors", "overwrite": True}
    over = [f"save={json.dumps(save)}", "quantizer={name: rtn, bits: 8, group_size: 32}"]
    _, spy, result = run_yaml(tiny_dir, text, monkeypatch, over)
    assert spy.names[-2:] == ["evaluate", "save"] and result.saved == str(out)
    assert not (out / "old.txt").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    provenance = json.loads((out / "wanda_provenance.json").read_text())
    assert provenance["metrics"]["sparsity_total"] == result.metrics["sparsity_total"]
    assert provenance["pruner"]["name"] == "wanda" and provenance["quantizer"]["bits"] == 8


def test_the_prune_command_hands_execute_its_tracker_outputs_and_name_and_reports_the_result(
        tiny_dir, tmp_path, monkeypatch, capsys):
    """cmd_prune's own wiring, with execute replaced: what it is given, and what is printed and logged
    from what it returns (the perplexity line, stage seconds, the results log, the run id)."""
    import wanda_pipeline.run as run_module
    import wanda_pipeline.tracking as tracking
    from wanda_pipeline.cli import main
    from wanda_pipeline.run import RunResult

    seen = {}

    class Tracker:
        def __init__(self, *args):
            seen["tracker_args"] = args

    def fake_execute(spec, **kw):
        seen.update(kw, spec=spec)
        return RunResult("p", metrics={"sparsity_total": 0.5, "ppl_wikitext2_vs_dense": 9.0, "ppl_wikitext2": 12.34567},
                         protocols={"perplexity": {"windows": 4, "seqlen": 128}}, seconds={"load": 1.0, "prune": 2.25},
                         saved="/somewhere", mlflow_run_id="run-1", tracking_uri="sqlite:///t.db")

    monkeypatch.setattr(tracking, "MLflowTracker", Tracker)
    monkeypatch.setattr(run_module, "execute", fake_execute)
    log = tmp_path / "new" / "log"
    code = main(["prune", "--model", str(tiny_dir), "--prune_method", "magnitude", "--save", str(log),
                 "--tracking-uri", "sqlite:///t.db", "--experiment", "exp"])
    out = capsys.readouterr().out
    assert code == 0
    assert seen["pipeline"] == "prune-magnitude" and seen["tracker_args"] == ("sqlite:///t.db", "exp")
    assert isinstance(seen["tracker"], Tracker) and seen["run_stage"].__name__ == "announce"
    folder = [o for o in seen["outputs"] if o.path == str(log)]
    assert len(folder) == 1 and folder[0].what == "results-log folder" and folder[0].overwrite is True
    assert out.splitlines()[:4] == ["*" * 30, "sparsity sanity check 0.5000",
                                    "wikitext perplexity 12.3457  (4 windows x 128 tokens)", "*" * 30]
    assert "stage seconds: load 1.0, prune 2.2" in out  # 2.25 rounds to even
    assert "saved pruned model to /somewhere" in out and "mlflow run run-1 (sqlite:///t.db)" in out
    assert (log / "log_magnitude.txt").read_text().splitlines() == ["method\tactual_sparsity\tppl_test",
                                                                    "magnitude\t0.5000\t12.34567"]
