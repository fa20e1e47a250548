"""The CLI on bad pipelines files: each with its message and exit code.

Most cases call ``cli.main`` in this process (the same argv handling and exit codes, without a
torch import per case); ``cli`` runs the real console entry as a subprocess where the process
boundary itself is what is checked."""

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from wanda_pipeline.cli import main
from wanda_pipeline.config import apply_overrides, load_file, parse_document
from wanda_pipeline.errors import ConfigError, PluginError
from wanda_pipeline.plugins import discover
from wanda_pipeline.regional.config import ReconstructConfig

GOOD = """
pipelines:
  p:
    model: {source: smollm2-135m}
    pruner: {name: wanda, sparsity: 0.5}
"""

# (name, file text, expected exit code, expected message fragments)
BAD = [
    ("yaml-syntax", "pipelines:\n  p: [unclosed\n", 2, ["not valid YAML at line"]),
    ("not-a-mapping", "- just\n- a list\n", 2, ["top level must be a mapping"]),
    ("no-pipelines", "defaults: {}\n", 2, ["pipelines: required"]),
    ("sparsity-too-high", GOOD.replace("0.5", "1.5"), 2, ["pipelines.p.pruner.sparsity: must be in [0, 1)"]),
    ("sparsity-negative", GOOD.replace("0.5", "-0.2"), 2, ["pipelines.p.pruner.sparsity: must be in [0, 1)"]),
    ("misspelt-option", GOOD.replace("sparsity:", "sparsty:"), 2, ["pipelines.p.pruner.sparsty: unknown option"]),
    ("bad-nm", GOOD.replace("sparsity: 0.5", "pattern: '4:2'"), 2, ["pipelines.p.pruner.pattern", "N < M"]),
    ("unknown-pruner", GOOD.replace("name: wanda", "name: wandaa"), 3,
     ["pipelines.p.pruner.name: unknown pruner 'wandaa'", "available: ", "magnitude"]),
    ("unknown-evaluator", GOOD + "    evaluators: [{name: bleu}]\n", 3,
     ["pipelines.p.evaluators.0.name: unknown evaluator"]),
    ("unknown-quantizer", GOOD + "    quantizer: {name: awq}\n", 3, ["pipelines.p.quantizer.name: unknown quantizer"]),
    ("missing-model", "pipelines:\n  p:\n    pruner: {name: wanda}\n", 2, ["pipelines.p.model: required but missing"]),
    ("unknown-section", GOOD + "    prunner: {name: wanda}\n", 2, ["pipelines.p.prunner: unknown option"]),
    ("bad-cron", GOOD + "    schedule: {cron: '61 * * * *'}\n", 2, ["pipelines.p.schedule.cron", "not a valid cron"]),
    ("bad-dtype", GOOD.replace("{source: smollm2-135m}", "{source: smollm2-135m, dtype: float8}"), 2,
     ["pipelines.p.model.dtype: unknown dtype 'float8'"]),
    ("bad-nsamples", GOOD + "    calibration: {nsamples: 0}\n", 2,
     ["pipelines.p.calibration.nsamples", "greater than 0"]),
    ("unset-env", GOOD.replace("smollm2-135m", "'${WANDA_TEST_UNSET_VAR}'"), 2,
     ["pipelines.p.model.source: environment variable WANDA_TEST_UNSET_VAR is not set"]),
    ("sweep-unknown-pipeline", GOOD + "sweeps:\n  s: {pipeline: nope}\n", 2, ["sweeps.s: unknown pipeline 'nope'"]),
    ("gate-without-evaluator", GOOD + "    register: {gates: {max_ppl_ratio: 1.3}}\n", 2,
     ["max_ppl_ratio needs a 'perplexity' evaluator"]),
]


def main_in_process(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli(*args, env_extra=None, cwd=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "wanda_pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("name,text,code,fragments", BAD, ids=[b[0] for b in BAD])
def test_validate_rejects_bad_file(tmp_path, capsys, name, text, code, fragments):
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    returncode, _, stderr = main_in_process(capsys, "validate", str(path))
    assert returncode == code, stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


def test_every_problem_is_listed_at_once(tmp_path, capsys):
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent("""
        pipelines:
          a:
            model: {source: smollm2-135m}
            pruner: {name: wanda, sparsity: 2, colour: red}
          b:
            pruner: {name: nope}
    """))
    returncode, _, stderr = main_in_process(capsys, "validate", str(path))
    assert returncode == 2
    assert "has 4 problem(s)" in stderr
    for frag in ["pipelines.a.pruner.sparsity", "pipelines.a.pruner.colour", "pipelines.b.model",
                 "pipelines.b.pruner.name"]:
        assert frag in stderr


def test_missing_file_and_run_of_unknown_pipeline(tmp_path):
    proc = cli("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "file not found" in proc.stderr
    (tmp_path / "pipelines.yaml").write_text(GOOD)
    proc = cli("run", "other", "-f", str(tmp_path / "pipelines.yaml"))
    assert proc.returncode == 2 and "no pipeline named 'other'; available: p" in proc.stderr


def test_shipped_pipelines_file_is_valid_and_listed():
    doc = load_file("pipelines.yaml", discover())
    assert {"smollm2-wanda", "smollm2-wanda-2-4", "smollm2-magnitude", "llama2-7b-wanda",
            "smollm2-wanda-2-4-reconstruct", "smollm2-wandapp-2-4"} <= set(doc.pipelines)
    assert doc.pipelines["smollm2-wanda-2-4-reconstruct"].reconstruct == ReconstructConfig()
    assert doc.pipelines["smollm2-wandapp-2-4"].pruner.name == "wanda++"
    llama = doc.pipelines["llama2-7b-wanda"]
    assert llama.calibration.nsamples == 128 and llama.calibration.seqlen == 2048
    proc = cli("list")
    assert proc.returncode == 0 and "0 3 * * 1" in proc.stdout and "smollm2-wanda" in proc.stdout


def test_defaults_env_and_overrides(monkeypatch):
    monkeypatch.setenv("WANDA_T_SEED", "7")
    raw = yaml.safe_load(GOOD + "defaults:\n  calibration: {seed: '${WANDA_T_SEED}', nsamples: 3}\n"
                         "  model: {source: '${WANDA_T_NONE:-fallback-model}'}\n")
    raw["pipelines"]["q"] = {"pruner": {"name": "magnitude"}}
    doc = parse_document(raw, discover())
    assert doc.pipelines["p"].calibration.seed == 7 and doc.pipelines["p"].calibration.nsamples == 3
    assert doc.pipelines["p"].model.source == "smollm2-135m"  # the pipeline's own key wins
    assert doc.pipelines["q"].model.source == "fallback-model"
    spec = apply_overrides(doc.pipelines["p"], ["pruner.sparsity=0.6", "calibration.nsamples=9",
                                                "quantizer={name: rtn, bits: 4}"])
    assert spec.pruner.options()["sparsity"] == 0.6 and spec.calibration.nsamples == 9
    assert spec.quantizer.name == "rtn"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(spec, ["pruner.sparsity"])
    with pytest.raises(ConfigError, match="nsamples"):
        apply_overrides(spec, ["calibration.nsamples=-1"])


def test_unknown_plugin_is_a_plugin_error():
    raw = yaml.safe_load(GOOD.replace("wanda", "nope"))
    with pytest.raises(PluginError, match="unknown pruner 'nope'"):
        parse_document(raw, discover())
