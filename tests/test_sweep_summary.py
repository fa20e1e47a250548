"""A sweep's summary shows what its evaluators measured; no evaluator is assumed (a sweep
without the 'sparsity' evaluator used to die with KeyError: 'sparsity_total', exit 1)."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import needs_data
from wanda_pipeline.cli import main
from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.orchestration.sweep import sweep_row
from wanda_pipeline.tracking.plots import sweep_figure


def summary(target: float, metrics: dict) -> dict:
    return {"params": {"pruner": {"name": "wanda", "pattern": "unstructured"}, "target_sparsity": target},
            "metrics": {**metrics, "time_load_s": 1.0, "peak_rss_bytes": 5}, "registration": None}


SPEC = PipelineSpec(model={"source": "m"}, pruner={"name": "wanda"})


@pytest.mark.parametrize("measured", [
    {"ppl_wikitext2": 30.0},  # perplexity only
    {"zeroshot_mean": 0.4},  # zero-shot only
    {},  # nothing scored at all
])
def test_rows_hold_what_was_measured_and_nothing_assumed(measured):
    row = sweep_row("p-s0.5", SPEC, summary(0.5, measured))
    assert row == {"pipeline": "p-s0.5", "pruner": "wanda", "pattern": "unstructured", "target": 0.5, **measured}


def test_the_figure_plots_the_target_when_sparsity_was_not_measured():
    table = [sweep_row(f"p-s{t}", SPEC, summary(t, {"ppl_wikitext2": p})) for t, p in ((0.6, 40.0), (0.3, 25.0))]
    for r in table:
        r["pipeline"] = "p"  # one line across the points, as a sweep over one pipeline draws it
    ax = sweep_figure(table, "ppl_wikitext2").axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.3, 0.6] and list(line.get_ydata()) == [25.0, 40.0]
    assert "not measured" in ax.get_xlabel()


def test_the_figure_plots_measured_sparsity_when_there_is_one():
    table = [{**sweep_row("p", SPEC, summary(t, {"ppl_wikitext2": p})), "sparsity_total": s}
             for t, p, s in ((0.5, 30.0, 0.49), (0.7, 60.0, 0.69))]
    ax = sweep_figure(table, "ppl_wikitext2").axes[0]
    assert list(ax.get_lines()[0].get_xdata()) == [0.49, 0.69] and ax.get_xlabel() == "sparsity"


@pytest.mark.slow
@needs_data
@pytest.mark.usefixtures("prefect_harness")
def test_a_sweep_without_the_sparsity_evaluator_finishes_with_its_table(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"model": {"source": str(tiny_dir)}, "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "pruner": {"name": "wanda"}, "evaluators": [{"name": "perplexity", "seqlen": 64, "windows": 2}],
            "register": {"enabled": False}, "tracking": {"uri": uri, "experiment": "sweep-any"}}
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"p": spec}, "sweeps": {"s": {"pipeline": "p",
                                                                              "sparsities": [0.3, 0.6]}}}))
    assert main(["sweep", "s", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ppl_wikitext2" in out and "sparsity_total" not in out and "p-s0.3" in out and "p-s0.6" in out
    client = MlflowClient(uri, uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-any").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep") == "s")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep_results.csv",
                                                                          "perplexity_vs_sparsity.png"}
