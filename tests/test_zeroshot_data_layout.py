"""The zero-shot evaluator and the preflight data check find local task files by the same rule:
``root/zeroshot/<file>`` (the shared data folder's layout, as $WANDA_DATA_DIR points at it) or
``root/<file>`` (a folder of the task files themselves). Preflight once looked only at the second,
so a pipeline with zero-shot on the documented layout was refused before it ran."""

from pathlib import Path

import pytest

from wanda_pipeline.datacheck import _evaluator_data
from wanda_pipeline.evaluators.zeroshot import LOCAL_FILES, ZeroShotConfig, local_task_file

TASKS = ["rte", "openbookqa"]


def _lay_out(root: Path, nested: bool) -> Path:
    base = root / "zeroshot" if nested else root
    for task in TASKS:
        f = base / LOCAL_FILES[task]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}\n")
    return root


@pytest.mark.parametrize("nested", [True, False], ids=["root/zeroshot/<file>", "root/<file>"])
def test_preflight_accepts_the_layouts_the_evaluator_reads(tmp_path, nested):
    root = _lay_out(tmp_path, nested)
    assert _evaluator_data("zeroshot", ZeroShotConfig(tasks=TASKS, data_dir=str(root))) == []
    for task in TASKS:  # the very file the evaluator will convert
        expected = root / ("zeroshot" if nested else "") / LOCAL_FILES[task]
        assert local_task_file(task, root) == expected and expected.exists()


def test_preflight_names_the_missing_task_and_the_folder(tmp_path):
    root = _lay_out(tmp_path, nested=True)
    (root / "zeroshot" / LOCAL_FILES["rte"]).unlink()
    problems = _evaluator_data("zeroshot", ZeroShotConfig(tasks=TASKS, data_dir=str(root)))
    assert len(problems) == 1 and "['rte']" in str(problems[0]) and str(root) in str(problems[0])


def test_preflight_reads_wanda_data_dir_when_no_data_dir_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDA_DATA_DIR", str(_lay_out(tmp_path, nested=True)))
    assert _evaluator_data("zeroshot", ZeroShotConfig(tasks=TASKS)) == []
    monkeypatch.setenv("WANDA_DATA_DIR", str(tmp_path / "elsewhere"))
    assert "no local data" in str(_evaluator_data("zeroshot", ZeroShotConfig(tasks=TASKS))[0])
