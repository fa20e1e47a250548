"""Real Prefect flows with real MLflow (sqlite) on the real SmolLM2 model."""

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import needs_data, quick_spec
from wanda_pipeline.data import wikitext2_test_tokens
from wanda_pipeline.errors import PreflightError
from wanda_pipeline.evaluators.perplexity import perplexity
from wanda_pipeline.models import state_digest
from wanda_pipeline.orchestration.compress import compress
from wanda_pipeline.orchestration.sweep import sweep
from wanda_pipeline.tracking import MLflowTracker

pytestmark = [pytest.mark.slow, needs_data, pytest.mark.usefixtures("prefect_harness")]


def task_names_in_order(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r.name.rsplit("-", 1)[0] for r in sorted(runs, key=lambda r: r.start_time)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One sqlite tracking store shared by the registry story below (tests run in file order)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_flow_runs_every_stage_and_tracks_it(registry):
    summary = compress("smollm2-demo", quick_spec("smollm2-135m", registry))
    expected = ["preflight", "load", "calibrate", "evaluate-dense", "prune", "evaluate", "register"]
    assert summary["stages"] == expected
    assert task_names_in_order(summary["prefect_flow_run_id"]) == expected  # as Prefect recorded them
    m = summary["metrics"]
    assert 0.4999 <= m["sparsity_total"] < 0.5001
    assert summary["dense"]["ppl_wikitext2"] < m["ppl_wikitext2"]
    assert m["ppl_wikitext2_vs_dense"] == pytest.approx(m["ppl_wikitext2"] / summary["dense"]["ppl_wikitext2"])

    client = MlflowClient(registry, registry)
    run = client.get_run(summary["mlflow_run_id"])
    p = run.data.params
    assert p["pruner.name"] == "wanda" and p["pruner.sparsity"] == "0.5" and p["calibration.nsamples"] == "4"
    assert len(p["calibration.windows_digest"]) == 16 and len(p["model.fingerprint"]) == 16
    assert p["eval.perplexity.seqlen"] == "128" and p["eval.perplexity.windows"] == "8"
    assert p["versions.torch"].startswith("2.13")
    assert run.data.tags["pipeline"] == "smollm2-demo"
    assert run.data.tags["prefect_flow_run_id"] == summary["prefect_flow_run_id"]
    metrics = run.data.metrics
    assert metrics["dense_ppl_wikitext2"] == pytest.approx(summary["dense"]["ppl_wikitext2"])
    assert "time_prune_s" in metrics and metrics["peak_rss_bytes"] > 0
    assert metrics["model_stored_ratio"] < 0.85  # bitmask storage beats dense float32
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"sparsity_per_layer.csv", "sparsity_per_layer.png", "pipeline_config.json",
            "evaluation_protocol.json"} <= artifacts
    csv = client.download_artifacts(run.info.run_id, "sparsity_per_layer.csv")
    assert len(open(csv).read().strip().splitlines()) == 1 + 30 * 7

    reg = summary["registration"]
    assert reg["promoted"] and reg["version"] == "1"
    mv = client.get_model_version_by_alias("smollm2-demo", "champion")
    assert str(mv.version) == "1" and mv.tags["pruner"] == "wanda" and mv.tags["sparsity"] == "0.5000"

    # The registered model reproduces the perplexity from the registry alone.
    tracker = MLflowTracker(registry, "tests")
    model, tok = tracker.load_model("models:/smollm2-demo@champion")
    ppl = perplexity(model, wikitext2_test_tokens(tok), 128, 8, progress=False)[0]
    assert ppl == pytest.approx(m["ppl_wikitext2"], rel=1e-6)
    assert state_digest(model) == summary["weights_digest"] == run.data.tags["weights_digest"]
    same, _ = tracker.load_model(summary["model_uri"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True))


def test_failed_gate_registers_without_promoting(registry):
    spec = quick_spec("smollm2-135m", registry, register={"gates": {"max_ppl_ratio": 1.01}})
    summary = compress("smollm2-demo", spec)
    reg = summary["registration"]
    assert reg["version"] == "2" and not reg["promoted"]
    assert "max_ppl_ratio" in reg["reason"]
    client = MlflowClient(registry, registry)
    assert str(client.get_model_version_by_alias("smollm2-demo", "champion").version) == "1"
    assert "max_ppl_ratio" in client.get_model_version("smollm2-demo", "2").tags["promotion_blocked_reason"]


def test_better_version_takes_the_alias_over_with_quantize_stage(registry):
    spec = quick_spec("smollm2-135m", registry, pruner={"name": "wanda", "sparsity": 0.3},
                      quantizer={"name": "rtn", "bits": 8})
    summary = compress("smollm2-demo", spec)
    assert summary["stages"] == ["preflight", "load", "calibrate", "evaluate-dense", "prune", "quantize",
                                 "evaluate", "register"]
    assert summary["metrics"]["quant_bits_per_weight"] == pytest.approx(8 + 16 / 128)
    reg = summary["registration"]
    assert reg["promoted"] and reg["version"] == "3"
    assert str(MlflowClient(registry, registry).get_model_version_by_alias("smollm2-demo", "champion").version) == "3"


def test_manual_promotion_is_recorded(registry):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "wanda_pipeline.cli", "promote", "smollm2-demo", "2",
                           "--tracking-uri", registry, "--reason", "reviewed by hand"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(registry, registry)
    mv = client.get_model_version_by_alias("smollm2-demo", "champion")
    assert str(mv.version) == "2" and mv.tags["promotion"] == "manual"
    assert mv.tags["promotion_reason"] == "reviewed by hand"
    proc = subprocess.run([sys.executable, "-m", "wanda_pipeline.cli", "promote", "smollm2-demo", "99",
                           "--tracking-uri", registry], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 6 and "no version 99" in proc.stderr


def test_bad_inputs_stop_before_heavy_work(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(PreflightError, match="/no/such/model"):
        compress("bad-model", quick_spec("/no/such/model", uri))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    spec = quick_spec("smollm2-135m", uri, calibration={"source": str(empty), "nsamples": 2, "seqlen": 64})
    with pytest.raises(PreflightError, match="empty|no text"):
        compress("bad-data", spec)
    client = MlflowClient(uri, uri)
    assert client.search_registered_models() == []
    exp = client.get_experiment_by_name("tests")
    assert exp is None or client.search_runs([exp.experiment_id]) == []  # failed before any run was opened


def test_sweep_table_and_parent_child_runs(tmp_path, tiny_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    points = [{"pipeline": f"tiny-s{s}", "spec": quick_spec(str(tiny_dir), uri, pruner={"name": "wanda", "sparsity": s},
                                                            register={"enabled": False})}
              for s in (0.2, 0.6)]
    table = sweep("grid", points)
    # the tiny model has 32 or 64 input columns, so per-row rounding is coarse: int(32 * 0.2) = 6 -> 0.1875
    assert [r["target"] for r in table] == [0.2, 0.6]
    assert all(abs(r["sparsity_total"] - r["target"]) < 1 / 32 for r in table)
    assert table[0]["ppl_wikitext2"] < table[1]["ppl_wikitext2"]
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep") == "grid")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep_results.csv",
                                                                          "perplexity_vs_sparsity.png"}
    # the dense baseline is measured once and reused by the second point
    assert children[0].data.metrics["dense_ppl_wikitext2"] == children[1].data.metrics["dense_ppl_wikitext2"]
    # ... with its per-example results, which every child logs for later paired comparisons
    dense_examples = []
    for child in children:
        assert {"examples.json", "dense_examples.json"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
        dense_examples.append(open(client.download_artifacts(child.info.run_id, "dense_examples.json")).read())
    assert dense_examples[0] == dense_examples[1]


def test_missing_evaluation_file_fails_in_validate(tmp_path, tiny_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = quick_spec(str(tiny_dir), uri, evaluators=[{"name": "perplexity", "path": str(tmp_path / "none.txt"),
                                                       "seqlen": 128, "windows": 2}, {"name": "sparsity"}])
    with pytest.raises(PreflightError, match="none.txt"):
        compress("tiny-missing-eval", spec)
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("tests")
    assert exp is None or client.search_runs([exp.experiment_id]) == []  # stopped before loading or tracking
