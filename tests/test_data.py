"""Calibration data: the reference get_c4 sampler, written out here, on the real C4 shard."""

import random

import pytest
import torch

from tests.conftest import needs_data
from wanda_pipeline.data import (
    calibration_windows,
    default_seqlen,
    load_documents,
    read_local_documents,
    sample_windows,
    self_generated_windows,
)
from wanda_pipeline.errors import ConfigError, DataError


def reference_get_c4(traindata, tokenizer, nsamples, seed, seqlen):
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(traindata) - 1)
            trainenc = tokenizer(traindata[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        trainloader.append(trainenc.input_ids[:, i : i + seqlen])
    return torch.cat(trainloader)


@needs_data
@pytest.mark.parametrize("seed,seqlen", [(0, 512), (7, 128)])
def test_sampler_reproduces_reference_get_c4(smollm2_tokenizer, seed, seqlen):
    docs = load_documents("c4", "train")
    assert len(docs) == 1000
    expected = reference_get_c4(docs, smollm2_tokenizer, 6, seed, seqlen)
    got = sample_windows(docs, smollm2_tokenizer, 6, seqlen, seed)
    assert torch.equal(got, expected)


@needs_data
def test_windows_carry_a_content_digest(smollm2_tokenizer):
    a = calibration_windows("c4", smollm2_tokenizer, 2, 64, 0)
    b = calibration_windows("c4", smollm2_tokenizer, 2, 64, 0)
    c = calibration_windows("c4", smollm2_tokenizer, 2, 64, 1)
    assert a.digest == b.digest != c.digest
    assert (a.nsamples, a.seqlen) == (2, 64)


def test_empty_and_short_data_fail_clearly(tmp_path, smollm2_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        calibration_windows(str(empty), smollm2_tokenizer, 2, 16, 0)
    short = tmp_path / "short.txt"
    short.write_text("a few words\n\nand a few more\n")
    with pytest.raises(DataError, match="no calibration document is longer than seqlen=64"):
        calibration_windows(str(short), smollm2_tokenizer, 2, 64, 0)
    with pytest.raises(DataError, match="not found|does not exist"):
        calibration_windows(str(tmp_path / "missing.jsonl"), smollm2_tokenizer, 2, 64, 0)


def test_local_txt_and_jsonl_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    assert read_local_documents(tmp_path / "a.txt") == ["first doc\nline two", "second doc"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n{"text": "z"}\n')
    assert read_local_documents(tmp_path / "b.jsonl") == ["x y", "z"]


def test_seqlen_default_never_silently_becomes_model_max():
    assert default_seqlen(131072) == 2048
    assert default_seqlen(1024) == 1024
    assert default_seqlen(8192, 512) == 512
    with pytest.raises(ConfigError, match="exceeds"):
        default_seqlen(1024, 2048)


def test_self_source_is_seeded(smollm2_tokenizer):
    from wanda_pipeline.tiny_models import tiny_model

    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    a = self_generated_windows(model, smollm2_tokenizer, 2, 12, seed=5)
    b = self_generated_windows(model, smollm2_tokenizer, 2, 12, seed=5)
    assert a.shape == (2, 12) and torch.equal(a, b)
