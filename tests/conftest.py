"""Shared fixtures. The environment is made offline and quiet before anything imports
Prefect, MLflow or the hub libraries."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_TASKS_DEFAULT_NO_CACHE": "true",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from wanda_pipeline.settings import data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = data_dir()
HAVE_DATA = DATA is not None and (DATA / "c4").exists()
SHARED_DATA = REPO.parent / "shared" / "data"
NO_DATA = "set WANDA_DATA_DIR to the shared data folder"
# Mark only tests that read /work/shared/data; a test that needs no data must not carry it.
needs_data = pytest.mark.needs_data


def missing_data() -> None:
    """Skip for want of data, except in CI next to ../shared/data, where a missing data folder is a bug."""
    if os.environ.get("CI") and SHARED_DATA.is_dir():
        pytest.fail(f"{NO_DATA}: CI is set and {SHARED_DATA} exists, but WANDA_DATA_DIR={DATA} has no c4/")
    pytest.skip(NO_DATA)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data: reads the shared data folder ($WANDA_DATA_DIR)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_data") and not HAVE_DATA:
        missing_data()


@pytest.fixture(scope="session")
def data() -> Path:
    if not HAVE_DATA:
        missing_data()
    return DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from wanda_pipeline.models import demo_model_dir

    return demo_model_dir("smollm2-135m")


@pytest.fixture()
def smollm2(smollm2_dir):
    """A fresh (model, tokenizer, info) of the real demo model; tests may prune it."""
    from wanda_pipeline.models import load_model

    return load_model(str(smollm2_dir))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def bin_path(name: str) -> str:
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else shutil.which(name)


@pytest.fixture()
def tokens_gen():
    def make(vocab: int, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
        return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random LLaMA with the real SmolLM2 tokenizer, saved as a local model folder."""
    from wanda_pipeline.tiny_models import tiny_model

    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0, layers=2, vocab_size=len(smollm2_tokenizer)).save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def quick_spec(source: str, tracking_uri: str | None = None, **over) -> dict:
    """A pipeline spec small enough for a CPU test: few calibration and evaluation windows."""
    spec = {
        "model": {"source": source},
        "calibration": {"source": "c4", "nsamples": 4, "seqlen": 128, "seed": 0},
        "pruner": {"name": "wanda", "sparsity": 0.5},
        "evaluators": [{"name": "perplexity", "seqlen": 128, "windows": 8}, {"name": "sparsity"}],
        "register": {"gates": {"max_ppl_ratio": 100.0, "beat_champion": "ppl_wikitext2"}},
        "tracking": {"uri": tracking_uri, "experiment": "tests"},
    }
    for key, value in over.items():
        spec[key] = value
    return spec
