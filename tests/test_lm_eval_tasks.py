"""The local zero-shot tasks as lm-eval YAMLs: the stock ``lm_eval`` CLI, given them with
``--include_path``, scores the same examples exactly as the zeroshot evaluator does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import needs_data
from wanda_pipeline.evaluators.lm_eval_tasks import main, write_tasks

TASKS = ["boolq", "winogrande", "arc_easy"]  # two-choice, multiple-input, and a task with acc_norm
LIMIT = 8


@needs_data
def test_written_tasks_are_the_evaluators_configs(tmp_path):
    from wanda_pipeline.evaluators.zeroshot import local_task_config

    paths = write_tasks(tmp_path, ["rte", "arc_easy"])
    assert [p.name for p in paths] == ["wanda_rte.yaml", "wanda_arc_easy.yaml"]
    cfg = yaml.safe_load(paths[1].read_text())
    ours = local_task_config("arc_easy")
    assert cfg["task"] == "wanda_arc_easy" and Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]).read_bytes() == \
        Path(ours["dataset_kwargs"]["data_files"]["test"]).read_bytes()
    assert {k: v for k, v in cfg.items() if k not in ("task", "dataset_kwargs")} == \
        {k: v for k, v in ours.items() if k not in ("task", "dataset_kwargs")}


def test_unknown_task_is_refused(tmp_path, capsys):
    assert main([str(tmp_path), "--tasks", "mmlu"]) == 2
    assert "no local data for tasks ['mmlu']" in capsys.readouterr().err


@pytest.mark.slow
@needs_data
def test_stock_lm_eval_cli_reproduces_the_evaluator(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wanda_pipeline.evaluators.zeroshot import ZeroShotConfig, ZeroShotEvaluator

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype="float32")
    ours = ZeroShotEvaluator(ZeroShotConfig(tasks=TASKS, limit=LIMIT, batch_size=1)).evaluate(
        model, AutoTokenizer.from_pretrained(tiny_dir)).metrics
    write_tasks(tmp_path / "tasks", TASKS)
    lm_eval = Path(sys.executable).parent / "lm_eval"
    out = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={tiny_dir},dtype=float32",
         "--include_path", str(tmp_path / "tasks"), "--tasks", ",".join(f"wanda_{t}" for t in TASKS),
         "--num_fewshot", "0", "--limit", str(LIMIT), "--batch_size", "1", "--device", "cpu",
         "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]
    for task in TASKS:
        got = results[f"wanda_{task}"]
        assert got["acc,none"] == pytest.approx(ours[f"zeroshot_{task}_acc"], abs=1e-12), task
        assert got["acc_stderr,none"] == pytest.approx(ours[f"zeroshot_{task}_acc_stderr"], abs=1e-12), task
        if f"zeroshot_{task}_acc_norm" in ours:
            assert got["acc_norm,none"] == pytest.approx(ours[f"zeroshot_{task}_acc_norm"], abs=1e-12), task
