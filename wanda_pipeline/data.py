"""Text sources (hub, local files, the model itself) and the reference window sampler."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from wanda_pipeline.errors import ConfigError, DataError
from wanda_pipeline.settings import DATA_DIR_ENV, data_dir

# Files looked for under $WANDA_DATA_DIR before going to the hub.
LOCAL_FILES = {
    ("c4", "train"): "c4/c4-train.00000-of-01024.first1000.jsonl",
    ("c4", "validation"): "c4/c4-validation.sample2000.jsonl",
    ("wikitext2", "test"): "wikitext-2-raw-v1/test.jsonl",
}
NAMED_SOURCES = ("c4", "wikitext2", "self")


@dataclass
class Windows:
    """Calibration token windows, shape (nsamples, seqlen), with their provenance."""

    tokens: torch.Tensor
    source: str
    seed: int

    @property
    def nsamples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def digest(self) -> str:
        return tokens_digest(self.tokens)


def tokens_digest(tokens: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(tokens.shape)).encode())
    h.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def read_local_documents(path: Path) -> list[str]:
    """Documents from a ``.jsonl`` (``text`` field) or ``.txt`` file (blank-line separated)."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the path or set ${DATA_DIR_ENV}")
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    if path.suffix in (".txt", ".raw"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8") from None
        return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    raise ConfigError(f"unsupported data file {path.name}: use .jsonl (with a 'text' field) or .txt")


def _jsonl_texts(path: Path, shown: int = 5) -> list[str]:
    """Every line a JSON object with a string ``text``; else one error naming the bad lines."""
    docs, bad = [], []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(f"line {lineno}: not UTF-8 (byte {exc.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(f"line {lineno}: is not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict) or "text" not in row:
                bad.append(f'line {lineno}: has no "text" field ({type(row).__name__})')
            elif not isinstance(row["text"], str):
                bad.append(f'line {lineno}: "text" is {type(row["text"]).__name__}, not a string')
            else:
                docs.append(row["text"])
    if bad:
        more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
        raise DataError(f"{path}: {len(bad)} bad line(s), each line needs a JSON object "
                        f'{{"text": "..."}}: ' + "; ".join(bad[:shown]) + more)
    return docs


def load_documents(source: str, split: str = "train", path: str | None = None) -> list[str]:
    """Documents of a named source or a file. Local files win over the hub."""
    local = local_document_file(source, split, path)
    return read_local_documents(local) if local is not None else _hub_documents(source, split)


def local_document_file(source: str, split: str = "train", path: str | None = None) -> Path | None:
    """The local file :func:`load_documents` reads, or None when it would go to the hub."""
    if path or source not in NAMED_SOURCES:
        return Path(path or source).expanduser()
    rel = LOCAL_FILES.get((source, split))
    root = data_dir()
    if rel and root is not None and (root / rel).exists():
        return root / rel
    return None


def _hub_documents(source: str, split: str) -> list[str]:
    from datasets import load_dataset

    try:
        if source == "c4":
            files = {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz",
            }
            ds = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        elif source == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            raise ConfigError(f"source {source!r} has no hub dataset")
    except (ConnectionError, OSError, ValueError) as exc:
        raise DataError(
            f"could not load {source} ({split}) from the hub: {exc}. Offline? Set ${DATA_DIR_ENV} to a "
            f"folder holding {LOCAL_FILES.get((source, split), 'the data')}, or give a local path."
        ) from exc
    return list(ds["text"])


def sample_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The reference ``get_c4`` sampler: ``random.seed(seed)``; per sample, draw random
    documents until one tokenizes to more than ``seqlen`` tokens, then a random window.

    Token lengths are cached so the draw sequence is identical to the reference, and a
    corpus with no long-enough document fails instead of looping forever.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise ConfigError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if not docs or not any(d.strip() for d in docs):
        raise DataError("calibration data is empty: the source has no documents with text")
    random.seed(seed)
    encoded: dict[int, torch.Tensor] = {}
    too_short: set[int] = set()
    windows = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            if i not in encoded:
                encoded[i] = tokenizer(docs[i], return_tensors="pt").input_ids
            ids = encoded[i]
            if ids.shape[1] > seqlen:
                break
            too_short.add(i)
            if len(too_short) == len(docs):
                longest = max(e.shape[1] for e in encoded.values())
                raise DataError(
                    f"no calibration document is longer than seqlen={seqlen} tokens (longest: {longest}). "
                    "Lower `seqlen` or use a corpus with longer documents."
                )
        start = random.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, start : start + seqlen])
    return torch.cat(windows, dim=0)


def self_generated_windows(model, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Data-free calibration: sample ``nsamples`` texts of ``seqlen`` tokens from the model."""
    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise DataError("the tokenizer has no BOS or EOS token to start self-generated text from")
    start = torch.full((nsamples, 1), bos, dtype=torch.long)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            start.to(device), do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=seqlen,
            min_new_tokens=seqlen, use_cache=True, pad_token_id=bos,
        )
    return out[:, -seqlen:].cpu()


def calibration_windows(
    source: str,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    path: str | None = None,
    model=None,
) -> Windows:
    if source == "self":
        if model is None:
            raise ConfigError("the 'self' calibration source needs the model")
        tokens = self_generated_windows(model, tokenizer, nsamples, seqlen, seed)
    else:
        docs = load_documents(source, "train", path)
        tokens = sample_windows(docs, tokenizer, nsamples, seqlen, seed)
    return Windows(tokens=tokens, source=path or source, seed=seed)


def default_seqlen(max_positions: int | None, requested: int | None = None) -> int:
    """``seqlen`` defaults to min(2048, model max); it is never silently the model max
    (the reference's ``model.seqlen = max_position_embeddings`` runs out of memory)."""
    limit = max_positions or 2048
    if requested is None:
        return min(2048, limit)
    if requested > limit:
        raise ConfigError(f"seqlen={requested} exceeds the model's maximum of {limit} positions")
    return requested


def wikitext2_test_tokens(tokenizer, path: str | None = None) -> torch.Tensor:
    """The reference evaluation text: ``"\\n\\n".join(test rows)``, tokenised once."""
    rows = load_documents("wikitext2", "test", path) if path is None else _rows(Path(path))
    return tokenizer("\n\n".join(rows), return_tensors="pt").input_ids


def _rows(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"evaluation file {path} does not exist; check the evaluator's `path`")
    if path.suffix == ".jsonl":
        return read_local_documents(path)
    return path.read_text(encoding="utf-8").split("\n")
