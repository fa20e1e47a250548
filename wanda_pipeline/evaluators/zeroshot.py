"""Zero-shot accuracy with upstream lm-eval on the in-memory model (never reloaded).

Online, tasks are lm-eval's own (``source: hub``). Offline (``source: local``), each of
the paper's seven tasks is read from ``$WANDA_DATA_DIR/zeroshot/`` and converted into
records of ``query`` / ``choices`` / ``gold`` built with the same prompt templates as
lm-eval's built-in task YAMLs; lm-eval then scores them the same way (loglikelihood of
each choice; acc, and acc_norm where the built-in reports it). See docs/zeroshot.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from wanda_pipeline.errors import DataError
from wanda_pipeline.intervals import mean_of_tasks_stderr, normal_interval
from wanda_pipeline.per_example import digest
from wanda_pipeline.plugins import EvalResult, PluginConfig
from wanda_pipeline.settings import cache_dir, data_dir

PAPER_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
LOCAL_FILES = {
    "boolq": "boolq/val.jsonl",
    "rte": "rte/val.jsonl",
    "hellaswag": "hellaswag/hellaswag_val_full.txt",
    "winogrande": "winogrande/winogrande_dev.llmfoundry.jsonl",
    "arc_easy": "arc_easy/ARC-Easy-Test.jsonl",
    "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
}
# Tasks whose built-in lm-eval config also reports length-normalised accuracy.
ACC_NORM = {"hellaswag", "arc_easy", "arc_challenge", "openbookqa"}
CONVERSION_VERSION = 1


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _arc_like(row: dict, stem_prefix: str = "Question: ", suffix: str = "\nAnswer:") -> dict:
    labels = [c["label"] for c in row["question"]["choices"]]
    return {"query": f"{stem_prefix}{row['question']['stem']}{suffix}",
            "choices": [c["text"] for c in row["question"]["choices"]],
            "gold": labels.index(row["answerKey"].strip())}


def convert(task: str, path: Path) -> list[dict]:
    """Local file -> records with the prompt lm-eval's built-in task would build."""
    if task == "boolq":  # lm-eval: "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices no/yes
        return [{"query": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", "choices": ["no", "yes"],
                 "gold": 1 if str(r["label"]).lower() == "true" else 0} for r in _jsonl(path)]
    if task == "rte":  # lm-eval (SuperGLUE/GLUE rte): "{{premise}}\nQuestion: {{hypothesis}} True or False?\nAnswer:"
        return [{"query": f"{r['premise']}\nQuestion: {r['hypothesis']} True or False?\nAnswer:",
                 "choices": ["True", "False"], "gold": 0 if r["label"] == "entailment" else 1} for r in _jsonl(path)]
    if task in ("arc_easy", "arc_challenge"):
        return [_arc_like(r) for r in _jsonl(path)]
    if task == "openbookqa":  # lm-eval: doc_to_text is the bare question stem
        return [_arc_like(r, "", "") for r in _jsonl(path)]
    if task == "winogrande":
        # lm-eval scores the shared continuation after each partial context (multiple-input task).
        return [{"contexts": r["context_options"], "target": " " + r["continuation"].strip(), "gold": int(r["gold"])}
                for r in _jsonl(path)]
    if task == "hellaswag":
        lines = path.read_text(encoding="utf-8").split("\n")
        out = []
        for i in range(0, len(lines) - 5, 6):
            ctx, label, *endings = lines[i : i + 6]
            out.append({"query": _hellaswag_clean(ctx), "choices": [_hellaswag_clean(e) for e in endings],
                        "gold": int(label)})
        return out
    raise DataError(f"no local conversion for task {task!r}; local tasks: {', '.join(PAPER_TASKS)}")


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess; the local file is already mostly cleaned.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def local_task_file(task: str, root: Path) -> Path:
    """Where a local task's file is under ``root``: ``root/zeroshot/<file>`` when ``root`` has a
    ``zeroshot`` folder (the shared data folder's layout), else ``root/<file>``."""
    return root / "zeroshot" / LOCAL_FILES[task] if (root / "zeroshot").exists() else root / LOCAL_FILES[task]


def local_task_config(task: str, root: Path | None = None) -> dict:
    """An lm-eval task config dict over a converted local file (cached by content)."""
    base = root or data_dir()
    if base is None:
        raise DataError(f"zero-shot task {task!r} with source 'local' needs $WANDA_DATA_DIR (or `data_dir:`) "
                        f"pointing at a folder with zeroshot/{LOCAL_FILES.get(task, '...')}")
    src = local_task_file(task, Path(base))
    if not src.exists():
        raise DataError(f"zero-shot data for {task!r} not found at {src}")
    out = cache_dir() / "zeroshot" / f"{task}-v{CONVERSION_VERSION}-{src.stat().st_size}.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(r) for r in convert(task, src)) + "\n", encoding="utf-8")
        tmp.replace(out)
    metrics = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    if task in ACC_NORM:
        metrics.append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
    cfg: dict[str, Any] = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(out.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "metric_list": metrics,
        "metadata": {"version": float(CONVERSION_VERSION), "source": str(src)},
    }
    if task == "winogrande":
        cfg.update(doc_to_text="gold", doc_to_target="target", doc_to_choice="contexts")
    else:
        cfg.update(doc_to_text="query", doc_to_target="gold", doc_to_choice="choices")
    return cfg


class ZeroShotConfig(PluginConfig):
    tasks: list[str] = Field(default_factory=lambda: list(PAPER_TASKS))
    source: Literal["local", "hub"] = "local"
    data_dir: str | None = Field(None, description="default $WANDA_DATA_DIR")
    limit: int | None = Field(None, gt=0, description="first N examples per task, for quick CPU runs")
    batch_size: int = Field(8, gt=0)
    seed: int = 1234
    device: str = "cpu"

    @model_validator(mode="after")
    def _known_local_tasks(self):
        unknown = [t for t in self.tasks if t not in LOCAL_FILES]
        if self.source == "local" and unknown:
            raise ValueError(f"no local data for tasks {unknown}; local tasks: {PAPER_TASKS} "
                             f"(or use source: hub for lm-eval's own tasks)")
        return self


class ZeroShotEvaluator:
    Config: ClassVar[type[ZeroShotConfig]] = ZeroShotConfig

    def __init__(self, config: ZeroShotConfig | None = None):
        self.config = config or ZeroShotConfig()

    def evaluate(self, model, tokenizer) -> EvalResult:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        c = self.config
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=c.batch_size, device=c.device)
        if c.source == "local":
            root = Path(c.data_dir) if c.data_dir else None
            tasks: list = [local_task_config(t, root) for t in c.tasks]
            manager = TaskManager(include_defaults=False)
        else:
            tasks, manager = list(c.tasks), TaskManager()
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=c.limit, task_manager=manager,
                                      random_seed=c.seed, numpy_random_seed=c.seed, torch_random_seed=c.seed,
                                      fewshot_random_seed=c.seed, log_samples=True, bootstrap_iters=1000)
        metrics, rows, examples = scores(out, c.tasks)
        protocol = {"tasks": ",".join(c.tasks), "source": c.source, "limit": c.limit, "num_fewshot": 0,
                    "seed": c.seed, "batch_size": c.batch_size, "lm_eval": lm_eval.__version__,
                    "task_versions": json.dumps({t: out.get("versions", {}).get(t) for t in c.tasks}),
                    "n_samples": json.dumps({t: out.get("n-samples", {}).get(t, {}).get("effective")
                                             for t in c.tasks}),
                    "mean_of": "acc", "stderr": "lm-eval's: sample std (ddof=1) / sqrt(n); mean: sqrt(sum se^2) / T"}
        return EvalResult(metrics=metrics, protocol=protocol, tables={"zeroshot": rows}, examples=examples)

    def per_example_metrics(self) -> dict[str, bool]:
        """The metrics this evaluator keeps per-example results for, and whether higher is better."""
        names = {f"zeroshot_{t}_acc": True for t in self.config.tasks}
        names.update({f"zeroshot_{t}_acc_norm": True for t in self.config.tasks if t in ACC_NORM})
        return {**names, "zeroshot_mean": True}

    def examples_per_group(self) -> int | None:
        """How many paired examples each task has at most (None: the whole task, unknown here)."""
        return self.config.limit


def scores(out: dict, tasks: list[str]) -> tuple[dict[str, float], list[dict], dict[str, dict]]:
    """Metrics (with stderr and n), the table rows and the per-example results of one lm-eval answer.

    The numbers and their stderr are lm-eval's own; the per-example 0/1 come from its logged samples."""
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    examples: dict[str, dict] = {}
    for task in tasks:
        res = out["results"][task]
        samples = sorted(out.get("samples", {}).get(task, []), key=lambda x: x["doc_id"])
        ids = [x["doc_id"] for x in samples]
        content = digest(f"{x['doc_id']}:{x['doc_hash']}:{x['prompt_hash']}:{x['target_hash']}" for x in samples)
        n = len(samples) or int(out.get("n-samples", {}).get(task, {}).get("effective", 0))
        row: dict[str, Any] = {"task": task, "n": n}
        for m in ("acc", "acc_norm"):
            if f"{m},none" in res:
                row[m] = float(res[f"{m},none"])
                row[f"{m}_stderr"] = float(res.get(f"{m}_stderr,none", float("nan")))
                metrics[f"zeroshot_{task}_{m}"] = row[m]
                metrics[f"zeroshot_{task}_{m}_stderr"] = row[f"{m}_stderr"]
                if samples:  # a group task (hub) logs its samples under its subtasks: no pairing then
                    examples[f"zeroshot_{task}_{m}"] = {"kind": "correct", "ids": ids, "digest": content,
                                                        "values": [int(float(x[m]) > 0.5) for x in samples]}
        metrics[f"zeroshot_{task}_n"] = float(n)
        rows.append(row)
    mean = sum(r["acc"] for r in rows) / len(rows)
    ci = normal_interval(mean, mean_of_tasks_stderr([r["acc_stderr"] for r in rows]), sum(r["n"] for r in rows))
    metrics.update({"zeroshot_mean": mean, "zeroshot_mean_stderr": ci.stderr, "zeroshot_mean_ci_low": ci.low,
                    "zeroshot_mean_ci_high": ci.high, "zeroshot_mean_n": float(ci.n)})
    parts = [f"zeroshot_{t}_acc" for t in tasks]
    if all(p in examples for p in parts):
        examples["zeroshot_mean"] = {"kind": "mean_of", "parts": parts}
    return metrics, rows, examples
