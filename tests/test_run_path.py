"""The one run path: `prune` and `run` track the same things; no second copy of the sequence;
cache keys follow content, not paths."""

import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, needs_data
from wanda_pipeline.cli import build_parser, main
from wanda_pipeline.cli_prune import prune_spec

pytestmark = needs_data


def test_no_entry_point_writes_the_sequence_again():
    calls = re.compile(r"stages\.(load|calibrate|prune|quantize|evaluate|save)\(|(?<!def )prune_model\(")
    # The conformance kit prunes one tiny model with one plugin: a plugin check, not a pipeline.
    # bench_latency only makes a synthetic 2:4 model to time; it runs no pipeline.
    allowed = {"wanda_pipeline/run.py", "wanda_pipeline/stages.py", "wanda_pipeline/testing.py",
               "bench/bench_latency.py"}
    offenders = []
    for path in [*REPO.glob("wanda_pipeline/**/*.py"), *REPO.glob("flows/*.py"), *REPO.glob("bench/*.py")]:
        rel = path.relative_to(REPO).as_posix()
        if rel in allowed or rel.startswith("wanda_pipeline/engine"):
            continue
        if calls.search(path.read_text()):
            offenders.append(rel)
    assert offenders == [], f"these call stages directly instead of run.execute: {offenders}"


def test_calibration_cache_key_follows_file_content(tmp_path, tiny_dir):
    from wanda_pipeline import stages
    from wanda_pipeline.config import CalibrationSpec, ModelSpec

    loaded = stages.load(ModelSpec(source=str(tiny_dir)))
    data = tmp_path / "calib.txt"
    data.write_text("first text about cats.\n\nmore about cats.")
    spec = CalibrationSpec(source=str(data), nsamples=2, seqlen=8)
    first = stages.calibration_key(spec, loaded)
    assert first == stages.calibration_key(spec, loaded)  # stable
    data.write_text("other text about dogs.\n\nmore about dogs.")  # same path, new content
    assert stages.calibration_key(spec, loaded) != first
    assert stages.calibration_key(spec.model_copy(update={"seed": 1}), loaded) != first
    assert stages.calibration_key(CalibrationSpec(source="c4", path=None), loaded) is not None  # local shard
    hub = CalibrationSpec(source="c4")
    import os

    saved = os.environ.pop("WANDA_DATA_DIR")
    try:
        assert stages.calibration_key(hub, loaded) is None  # hub data: never cached
    finally:
        os.environ["WANDA_DATA_DIR"] = saved


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_prune_and_run_track_the_same_params_and_metrics(tmp_path, tiny_dir, capsys):
    from wanda_pipeline.orchestration.compress import compress

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["prune", "--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "64", "--eval-windows", "2",
            "--tracking-uri", uri, "--experiment", "parity"]
    assert main(argv) == 0, capsys.readouterr().err
    spec = prune_spec(build_parser().parse_args(argv))
    summary = compress("prune-wanda", spec.model_dump(by_alias=True))
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("parity")
    runs = {r.data.tags.get("prefect_flow_run_id") is not None: r for r in client.search_runs([exp.experiment_id])}
    via_prune, via_run = runs[False], runs[True]
    assert via_run.info.run_id == summary["mlflow_run_id"]
    assert via_prune.data.params == via_run.data.params
    assert set(via_prune.data.metrics) == set(via_run.data.metrics)
    for k, v in via_prune.data.metrics.items():
        if not k.startswith(("time_", "peak_")):
            assert via_run.data.metrics[k] == pytest.approx(v), k
    for r in (via_prune, via_run):  # one engine row per block, as steps
        assert [m.step for m in client.get_metric_history(r.info.run_id, "time_block_s")] == [0, 1]
    artifacts = [{a.path for a in client.list_artifacts(r.info.run_id)} for r in (via_prune, via_run)]
    assert artifacts[0] == artifacts[1]
    assert Path(tmp_path).exists()
