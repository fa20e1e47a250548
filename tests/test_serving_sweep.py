"""`sweep NAME --set key=value` overrides every swept pipeline, as `run --set` does one."""

import pytest

from wanda_pipeline.cli import main
from wanda_pipeline.errors import ConfigError
from wanda_pipeline.pipelines_file import load_file, sweep_overrides, sweep_points

FILE = """
version: 1
defaults:
  calibration: {{nsamples: 32, seqlen: 64}}
  evaluators: [{{name: sparsity}}]
  register: {{enabled: false}}
  tracking: {{uri: "sqlite:///{db}", experiment: tests}}
pipelines:
  a: {{model: {{source: "{model}"}}, pruner: {{name: magnitude, sparsity: 0.5}}}}
  b: {{model: {{source: "{model}"}}, pruner: {{name: magnitude, sparsity: 0.5}}}}
  other: {{model: {{source: "{model}"}}, pruner: {{name: magnitude, sparsity: 0.5}}}}
sweeps:
  grid: {{pipeline: a, sparsities: [0.3, 0.6], pipelines: [b]}}
"""


def _file(tmp_path, model="tiny"):
    path = tmp_path / "pipelines.yaml"
    path.write_text(FILE.format(db=tmp_path / "mlflow.db", model=model))
    return path


def test_overrides_reach_every_point_and_only_the_swept_pipelines(tmp_path):
    doc = load_file(_file(tmp_path))
    over = sweep_overrides(doc, "grid", ["calibration.nsamples=4", "engine.exclude=mlp"])
    points = sweep_points(over, "grid")
    assert [p["pipeline"] for p in points] == ["a-s0.3", "a-s0.6", "b"]
    assert [p["spec"]["pruner"]["sparsity"] for p in points] == [0.3, 0.6, 0.5]  # the grid still wins
    for p in points:
        assert (p["spec"]["calibration"]["nsamples"], p["spec"]["engine"]["exclude"]) == (4, "mlp")
    assert over.pipelines["other"].calibration.nsamples == 32  # not in the sweep
    assert doc.pipelines["a"].calibration.nsamples == 32  # the loaded file is not changed
    with pytest.raises(ConfigError, match="sets the sparsity of each point"):
        sweep_overrides(doc, "grid", ["pruner.sparsity=0.2"])
    with pytest.raises(ConfigError, match="nsamples"):
        sweep_overrides(doc, "grid", ["calibration.nsamples=-1"])


def test_bad_set_is_a_config_error_before_anything_runs(tmp_path, capsys):
    f = str(_file(tmp_path))
    assert main(["sweep", "grid", "--file", f, "--set", "calibration.nsampels=4"]) == ConfigError.exit_code
    assert "nsampels" in capsys.readouterr().err
    assert main(["sweep", "grid", "--file", f, "--set", "novalue"]) == ConfigError.exit_code
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_sweep_runs_with_the_override(tmp_path, tiny_dir, capsys):
    f = str(_file(tmp_path, tiny_dir))
    assert main(["sweep", "grid", "--file", f, "--set", "pruner.pattern=unstructured",
                 "--set", "engine.include=mlp"]) == 0
    rows = {cells[1].strip(): float(cells[-2]) for line in capsys.readouterr().out.splitlines()
            if len(cells := line.split("│")) > 3 and cells[1].strip() in ("a-s0.3", "a-s0.6", "b")}
    # only the MLP linears are pruned: 3 * 32 * 64 of the 3 * 32 * 64 + 2 * 32 * 32 + 2 * 32 * 16 weights
    mlp, attn = 3 * 32 * 64, 2 * 32 * 32 + 2 * 32 * 16
    for label, target in (("a-s0.3", 0.3), ("a-s0.6", 0.6), ("b", 0.5)):
        assert rows[label] == pytest.approx(target * mlp / (mlp + attn), abs=1e-3)
