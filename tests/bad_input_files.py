"""Broken files for the bad-input table: copies of the tiny model with one thing wrong, GGUF
files written with the gguf library, calibration files and checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


def corrupt_copy(tiny: Path, tmp: Path, how: str) -> Path:
    bad = tmp / f"model-{how}"
    shutil.copytree(tiny, bad)
    config = json.loads((bad / "config.json").read_text())
    if how == "truncated":
        f = bad / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "no-config":
        (bad / "config.json").unlink()
    elif how == "bad-config":
        (bad / "config.json").write_text("{not json")
    elif how == "no-weights":
        (bad / "model.safetensors").unlink()
    elif how in ("more-layers", "fewer-layers"):  # config.json no longer describes the weights
        config["num_hidden_layers"] += 1 if how == "more-layers" else -1
    elif how == "other-shape":
        config["intermediate_size"] += 16
    elif how == "bad-tokenizer":
        (bad / "tokenizer.json").write_text("{oops")
    elif how == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (bad / name).unlink(missing_ok=True)
    elif how == "index-missing-shard":
        (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
        weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                      "lm_head.weight": "model-00002-of-00002.safetensors"}
        (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(how)
    if how in ("more-layers", "fewer-layers", "other-shape"):
        (bad / "config.json").write_text(json.dumps(config))
    return bad


def gguf_file(tmp: Path, how: str) -> str:
    """A small GGUF written by the gguf library: 3 blocks declared; one thing wrong."""
    from gguf import GGUFWriter

    path = tmp / f"{how}.gguf"
    writer = GGUFWriter(str(path), "nosucharch" if how == "unknown-arch" else "llama")
    writer.add_block_count(3)
    writer.add_context_length(256)
    if how != "no-tokenizer":
        writer.add_token_list(["<s>", "a", "b"])
    for b in range(2 if how == "block-count" else 3):
        writer.add_tensor(f"blk.{b}.attn_q.weight", np.ones((32, 32), dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.ones((3, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    return str(path)


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def checkpoint(tmp: Path, how: str) -> str:
    folder = tmp / f"ckpt-{how}"
    folder.mkdir()
    if how == "corrupt-manifest":
        (folder / "manifest.json").write_text("{oops")
    elif how == "missing-block":  # counts one finished block that is not there
        (folder / "manifest.json").write_text(json.dumps({"version": 1, "fingerprint": {}, "n_blocks": 2,
                                                          "finished": 1}))
    elif how == "not-a-checkpoint":
        (folder / "notes.txt").write_text("mine")
    return str(folder)
