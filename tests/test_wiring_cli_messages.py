"""What the prune command tells a user about a bad quantizer flag, before any work, and what its
stage runner prints (the stage markers other tests and users watch for)."""

from __future__ import annotations

import pytest

from tests.test_wiring_flags import flags
from wanda_pipeline import cli_prune
from wanda_pipeline.errors import ConfigError

CT = "--save_format compressed-tensors needs a quantizer: without one it would write dense, unquantized weights. "


@pytest.mark.parametrize("argv, message", [
    (["--quantizer", "rtn", "--quantizer_option", "symmetric"],
     "--quantizer_option 'symmetric': expected KEY=VALUE, e.g. symmetric=false"),
    (["--quantizer", "rtn", "--quantizer_option", " =4"],
     "--quantizer_option ' =4': expected KEY=VALUE, e.g. symmetric=false"),
    (["--bits", "4"], "--bits set without --quantizer; add e.g. --quantizer rtn"),
    (["--bits", "4", "--group_size", "64"], "--bits, --group_size set without --quantizer; add e.g. --quantizer rtn"),
    (["--quantizer_option", "symmetric=false"],
     "--quantizer_option symmetric set without --quantizer; add e.g. --quantizer rtn"),
    (["--save_model", "/o", "--save_format", "compressed-tensors"],
     CT + "Add e.g. --quantizer rtn --bits 4 --group_size 128 (int4 pack-quantized, what vLLM serves), or use "
     "--save_format hf for a dense folder"),
])
def test_a_bad_quantizer_flag_is_a_config_error_that_says_the_fix(argv, message):
    with pytest.raises(ConfigError) as err:
        flags(*argv)
    assert str(err.value) == message


def test_quantizer_options_are_stripped_yaml_values():
    spec = flags("--quantizer", "rtn", "--quantizer_option", " symmetric = false", "--quantizer_option", "bits=8",
                 "--quantizer_option", "note=a=b")
    assert spec.quantizer.options() == {"symmetric": False, "bits": 8, "note": "a=b"}
    assert flags("--save_model", "/o").quantizer is None  # hf needs none


@pytest.mark.parametrize("flag", ["--nsamples", "--threads", "--seqlen", "--eval-windows"])
def test_integer_flags_are_refused_by_the_parser(capsys, flag):
    with pytest.raises(SystemExit) as err:
        flags(flag, "x")
    assert err.value.code == 2 and f"argument {flag}: invalid int value: 'x'" in capsys.readouterr().err


def test_the_stage_runner_announces_each_stage_then_runs_it(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("wanda_pipeline.estimate.before_stage", lambda name, args: seen.append((name, args)))
    out = cli_prune.announce("prune", lambda a, b: a + b, 2, 3, cache_key="k")
    assert out == 5 and seen == [("prune", (2, 3))]
    assert capsys.readouterr().err == "[stage] prune\n"
