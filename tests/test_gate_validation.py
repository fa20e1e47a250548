"""`validate` refuses promotion gates that can never pass, each with its reason and fix
(rows in the style of tests/test_cli_config.py)."""

import pytest

from wanda_pipeline.cli import main

HEAD = """
pipelines:
  p:
    model: {source: smollm2-135m}
    pruner: {name: wanda, sparsity: 0.5}
"""
PPL = "    evaluators: [{name: perplexity, windows: WINDOWS}, {name: sparsity}]\n"
ZS = "    evaluators: [{name: zeroshot, tasks: [boolq, rte], limit: LIMIT}, {name: sparsity}]\n"


def gates(text: str) -> str:
    return f"    register: {{gates: {{{text}}}}}\n"


# (name, file text, expected exit code, expected message fragments)
IMPOSSIBLE = [
    ("ratio-without-dense-baseline", HEAD + PPL.replace("WINDOWS", "16") + "    dense_baseline: false\n"
     + gates("max_ppl_ratio: 2.0"), 2,
     ["register.gates.max_ppl_ratio compares with the dense model, but dense_baseline is false"]),
    ("zeroshot-ratio-without-dense-baseline", HEAD + ZS.replace("LIMIT", "100") + "    dense_baseline: false\n"
     + gates("min_zeroshot_ratio: 0.9"), 2, ["min_zeroshot_ratio compares with the dense model"]),
    ("beat-champion-metric-nobody-produces", HEAD + PPL.replace("WINDOWS", "16") + gates("beat_champion: ppl_c4"), 2,
     ["register.gates.beat_champion: 'ppl_c4' is not a metric any evaluator", "use one of: ppl_wikitext2"]),
    ("beat-champion-without-per-example-results", HEAD + gates("beat_champion: sparsity_total"), 2,
     ["'sparsity_total' is not a metric any evaluator", "none (add a perplexity or zeroshot evaluator)"]),
    ("zeroshot-ratio-too-few-examples", HEAD + ZS.replace("LIMIT", "5") + gates("min_zeroshot_ratio: 0.9"), 2,
     ["register.gates.min_zeroshot_ratio: evaluator 'zeroshot' scores at most 5 examples per task",
      "confidence 0.95 with fewer than 6", "Set its `limit` to at least 6"]),
    ("zeroshot-beat-too-few-at-99", HEAD + ZS.replace("LIMIT", "7") +
     gates("beat_champion: zeroshot_boolq_acc, confidence: 0.99"), 2,
     ["register.gates.beat_champion: evaluator 'zeroshot' scores at most 7 examples per task",
      "confidence 0.99 with fewer than 8"]),
    ("ppl-ratio-too-few-windows", HEAD + PPL.replace("WINDOWS", "4") + gates("max_ppl_ratio: 2.0"), 2,
     ["evaluator 'perplexity' scores at most 4 windows", "Set its `windows` to at least 6"]),
    ("direction-contradicts-metric", HEAD + ZS.replace("LIMIT", "50") +
     gates("beat_champion: zeroshot_mean, lower_is_better: true"), 2,
     ["lower_is_better: True contradicts 'zeroshot_mean', where higher is better"]),
    ("confidence-out-of-range", HEAD + gates("confidence: 1.0"), 2, ["register.gates.confidence", "less than 1"]),
    ("unknown-bound", HEAD + gates("bound: median"), 2, ["register.gates.bound", "'interval' or 'point'"]),
]

POSSIBLE = [
    ("point-bound-few-examples", HEAD + ZS.replace("LIMIT", "5") + gates("min_zeroshot_ratio: 0.9, bound: point")),
    ("just-enough-examples", HEAD + ZS.replace("LIMIT", "6") + gates("min_zeroshot_ratio: 0.9, beat_champion: "
                                                                     "zeroshot_mean")),
    ("lower-confidence", HEAD + PPL.replace("WINDOWS", "4") + gates("max_ppl_ratio: 2.0, confidence: 0.8")),
    ("registration-off", HEAD + PPL.replace("WINDOWS", "2") + "    register: {enabled: false, gates: "
                                                              "{beat_champion: ppl_wikitext2}}\n"),
]


def validate(tmp_path, capsys, text):
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    capsys.readouterr()
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name,text,code,fragments", IMPOSSIBLE, ids=[b[0] for b in IMPOSSIBLE])
def test_validate_refuses_a_gate_that_can_never_pass(tmp_path, capsys, name, text, code, fragments):
    returncode, stderr = validate(tmp_path, capsys, text)
    assert returncode == code, stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


@pytest.mark.parametrize("name,text", POSSIBLE, ids=[p[0] for p in POSSIBLE])
def test_validate_accepts_a_gate_that_can_pass(tmp_path, capsys, name, text):
    returncode, stderr = validate(tmp_path, capsys, text)
    assert returncode == 0, stderr
