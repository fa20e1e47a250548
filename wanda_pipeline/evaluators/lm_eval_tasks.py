"""The local zero-shot tasks as lm-eval task YAMLs, for the stock ``lm_eval`` command.

    python -m wanda_pipeline.evaluators.lm_eval_tasks OUT_DIR [--tasks boolq,rte] [--data-dir DIR]
    lm_eval --model hf --model_args pretrained=MODEL_DIR --include_path OUT_DIR \\
            --tasks wanda_boolq,wanda_rte --num_fewshot 0 --limit 50

Each YAML is the very task config the ``zeroshot`` evaluator hands lm-eval (one source:
:func:`wanda_pipeline.evaluators.zeroshot.local_task_config`), renamed ``wanda_<task>`` so it
cannot clash with lm-eval's built-in task of the same name, and pointing at the converted
JSONL copied next to it by absolute path (lm-eval resolves relative ``data_files`` against the
current folder, not the YAML's). So the stock CLI scores the same prompts, offline.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from wanda_pipeline.evaluators.zeroshot import PAPER_TASKS, local_task_config

PREFIX = "wanda_"


def write_tasks(out_dir: str | Path, tasks: list[str] | None = None, data_dir: str | Path | None = None
                ) -> list[Path]:
    """Write ``wanda_<task>.yaml`` and ``wanda_<task>.jsonl`` for each task into ``out_dir``."""
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks or PAPER_TASKS:
        cfg = local_task_config(task, Path(data_dir) if data_dir else None)
        data = out / f"{PREFIX}{task}.jsonl"
        shutil.copyfile(cfg["dataset_kwargs"]["data_files"]["test"], data)
        cfg["task"] = PREFIX + task
        cfg["dataset_kwargs"] = {"data_files": {"test": str(data)}}
        path = out / f"{PREFIX}{task}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from wanda_pipeline.errors import WandaPipelineError

    p = argparse.ArgumentParser(prog="python -m wanda_pipeline.evaluators.lm_eval_tasks",
                                description="write the local zero-shot tasks as lm-eval task YAMLs")
    p.add_argument("out_dir")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated (default: the paper's seven)")
    p.add_argument("--data-dir", default=None, help="default $WANDA_DATA_DIR")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in PAPER_TASKS]
    if unknown:
        print(f"error: no local data for tasks {unknown}; local tasks: {', '.join(PAPER_TASKS)}", file=sys.stderr)
        return 2
    try:
        paths = write_tasks(args.out_dir, tasks, args.data_dir)
    except WandaPipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    names = ",".join(PREFIX + t for t in tasks)
    print(f"wrote {len(paths)} task(s) to {Path(args.out_dir).resolve()}\n"
          f"lm_eval --model hf --model_args pretrained=MODEL_DIR --include_path {Path(args.out_dir).resolve()} "
          f"--tasks {names} --num_fewshot 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
