"""Cheap opens of what a run reads besides the weights: the tokenizer files, calibration and
evaluation files (record by record), the length of calibration documents against the seqlen,
and a checkpoint to resume from. Each problem names the file and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanda_pipeline.config import PipelineSpec
from wanda_pipeline.data import default_seqlen, local_document_file
from wanda_pipeline.errors import DataError, WandaPipelineError
from wanda_pipeline.quantizers.calibrated import calibrated_stats

if TYPE_CHECKING:
    from wanda_pipeline.sourcecheck import SourceFacts
    from wanda_pipeline.stages import Plugins

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")
SLACK_TOKENS = 8  # a tokenizer adds at most this many tokens beyond one per UTF-8 byte (BOS/EOS, prefix space)


def check_tokenizer(folder: Path | None, trust_remote_code: bool = False) -> tuple[Any, list[WandaPipelineError]]:
    """Load the tokenizer of a local model folder as the load stage will; (tokenizer or None, problems)."""
    if folder is None:
        return None, []
    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not set(present) - {"tokenizer_config.json"}:
        return None, [DataError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json "
                                f"with merges.txt); save the tokenizer there (tokenizer.save_pretrained) or copy "
                                f"the files from the original model")]
    for name in present:
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                return None, [DataError(f"tokenizer file {folder / name} is not readable JSON ({exc}); re-save or "
                                        f"re-download the tokenizer")]
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code), []
    except Exception as exc:  # what the load stage would fail on, after minutes
        return None, [DataError(f"the tokenizer in {folder} ({', '.join(present)}) cannot be loaded "
                                f"({type(exc).__name__}: {str(exc)[:300]}); re-save or re-download it")]


def read_documents(path: Path, what: str) -> tuple[list[str], list[WandaPipelineError]]:
    """A local text/JSONL file's documents; problems if it is missing, unreadable or has no text."""
    from wanda_pipeline.data import read_local_documents

    if not path.exists():
        return [], [DataError(f"{what} file {path} does not exist; fix the path (or set $WANDA_DATA_DIR)")]
    try:
        docs = read_local_documents(path)
    except (WandaPipelineError, OSError) as exc:
        said = str(exc).removeprefix(f"{path}: ").removeprefix(f"{path} ")
        return [], [(type(exc) if isinstance(exc, WandaPipelineError) else DataError)(f"{what} file {path}: {said}")]
    if not any(d.strip() for d in docs):
        return [], [DataError(f"{what} file {path} has no text; give a file with text in it")]
    return docs, []


def long_enough(docs: list[str], tokenizer: Any, seqlen: int, path: Path) -> list[WandaPipelineError]:
    """The sampler needs a document longer than ``seqlen`` tokens. Without a tokenizer, a bound:
    a document of B UTF-8 bytes has at most B + SLACK_TOKENS tokens. With one, the longest
    documents are tokenised until one is long enough (usually the first)."""
    sizes = sorted(((len(d.encode("utf-8")), i) for i, d in enumerate(docs)), reverse=True)
    candidates = [i for size, i in sizes if size + SLACK_TOKENS > seqlen]
    longest = None
    if tokenizer is not None and candidates:
        longest = 0
        for i in candidates:
            n = len(tokenizer(docs[i]).input_ids)
            if n > seqlen:
                return []
            longest = max(longest, n)
    elif candidates:
        return []
    got = f"{longest} tokens" if longest is not None else f"{sizes[0][0]} bytes" if sizes else "none"
    return [DataError(f"no calibration document in {path} is longer than seqlen={seqlen} tokens (the longest: "
                      f"{got}); the sampler needs one. Lower calibration.seqlen (--seqlen) or use longer documents")]


def check_checkpoint(folder: Path, resume: bool) -> list[WandaPipelineError]:
    """A checkpoint that a resumed run would read must be whole (manifest and the blocks it counts)."""
    from wanda_pipeline.engine.checkpoint import MANIFEST, manifest_problem

    if not resume or not (folder / MANIFEST).exists():
        return []
    problem = manifest_problem(folder)
    if problem is None:
        return []
    return [DataError(f"checkpoint {folder / MANIFEST} is corrupt: {problem}; pass --no_resume (engine.resume: "
                      f"false) to start fresh there, or remove {folder}")]


def _offline(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def check_data(spec: PipelineSpec, plugins: Plugins, facts: SourceFacts | None = None,
               tokenizer: Any = None) -> list[WandaPipelineError]:
    problems: list[WandaPipelineError] = []
    cal = spec.calibration
    # unknown pruner: assume it needs data; reconstruction and a calibrated quantizer (gptq) do
    needs_data = (plugins.pruner is None or plugins.pruner.required_stats() or spec.reconstruct is not None
                  or calibrated_stats(plugins.quantizer))
    if needs_data and cal.source != "self":
        local = local_document_file(cal.source, "train", cal.path)
        if local is not None:
            docs, bad = read_documents(local, "calibration")
            limit = facts.max_positions if facts else None
            if docs and not (limit and cal.seqlen and cal.seqlen > limit):  # check_seqlens reports that one
                bad += long_enough(docs, tokenizer, default_seqlen(limit, cal.seqlen), local)
            problems += bad
        elif _offline("HF_DATASETS_OFFLINE"):
            problems.append(DataError(f"calibration source {cal.source!r} has no local file and HF_DATASETS_OFFLINE=1; "
                                      f"set $WANDA_DATA_DIR to the data folder or give calibration.path"))
    for key, ev in plugins.evaluators.items():
        problems += _evaluator_data(key, ev.config)
    checkpoint = spec.engine.checkpoint_dir
    if checkpoint and checkpoint != "auto":  # 'auto' is keyed by the weights: checked when the run starts
        problems += check_checkpoint(Path(checkpoint).expanduser(), spec.engine.resume)
    return problems


def _evaluator_data(key: str, cfg: Any) -> list[WandaPipelineError]:
    path = getattr(cfg, "path", None)
    if path:
        p = Path(path).expanduser()
        ok = p.exists() and p.stat().st_size > 0
        if not ok:
            return [DataError(f"evaluator {key!r} reads {path!r}, which is missing or empty; fix its `path`")]
        return read_documents(p, f"evaluator {key!r}")[1] if p.suffix == ".jsonl" else []
    dataset = getattr(cfg, "dataset", None)
    if dataset and local_document_file(dataset, "test" if dataset == "wikitext2" else "validation") is None \
            and _offline("HF_DATASETS_OFFLINE"):
        return [DataError(f"evaluator {key!r} needs {dataset!r}, which has no local file and HF_DATASETS_OFFLINE=1; "
                          f"set $WANDA_DATA_DIR to the data folder or give the evaluator a `path`")]
    if getattr(cfg, "source", None) == "local" and hasattr(cfg, "tasks"):
        from wanda_pipeline.evaluators.zeroshot import local_task_file
        from wanda_pipeline.settings import data_dir

        root = Path(cfg.data_dir) if getattr(cfg, "data_dir", None) else data_dir()
        missing = [t for t in cfg.tasks if root is None or not local_task_file(t, Path(root)).exists()]
        if missing:
            return [DataError(f"evaluator {key!r}: no local data for tasks {missing} under {root}; "
                              f"set its `data_dir` or $WANDA_DATA_DIR")]
    return []
