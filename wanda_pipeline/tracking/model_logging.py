"""How a saved model folder becomes an MLflow model, and how a downloaded one is read back.

- A transformers checkpoint (``hf``, or ``compressed-tensors`` that transformers loads as it is)
  is logged with MLflow's **transformers flavour** (task ``text-generation``; MLflow writes it
  again with ``save_pretrained`` under ``model/``, the tokenizer under ``components/tokenizer/``):
  it serves and loads with nothing of this package installed, and its pip requirements name
  only torch, transformers (and compressed-tensors).
- ``bitmask-v1`` folders, and compressed-tensors folders with zero points (asymmetric), which
  transformers 5.23 only loads with ``CompressedTensorsConfig(dequantize=True)``, an option
  MLflow's loader cannot pass, are logged as a **pyfunc** whose loader module is
  :mod:`wanda_pipeline.mlflow_model` (no pickle); serving those needs this package.

Both carry one signature: a column of prompt strings in, a column of strings out, and the
generation params of :data:`wanda_pipeline.mlflow_model.GENERATION_DEFAULTS` with their defaults
(without a params schema, ``mlflow models serve`` ignores request params), plus an input example.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wanda_pipeline.mlflow_model import GENERATION_DEFAULTS, is_compressed_tensors
from wanda_pipeline.saving import SPARSE_FILE

EXAMPLE_PROMPTS = ["The capital of France is"]
TRANSFORMERS = "transformers"
PYFUNC = "pyfunc"


def generation_signature():
    """Prompts (strings) in, generated text out, generation params with defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {bool: "boolean", int: "long", float: "double"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in GENERATION_DEFAULTS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=params)


def input_example() -> tuple[list[str], dict[str, Any]]:
    return list(EXAMPLE_PROMPTS), {"max_new_tokens": 4}


def has_zero_points(folder: str | Path) -> bool:
    quant = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    groups = (quant.get("config_groups") or {}).values()
    return any((g.get("weights") or {}).get("symmetric") is False for g in groups)


def flavour_of(folder: str | Path) -> str:
    """``transformers`` for a checkpoint MLflow's transformers loader reads as it is, else ``pyfunc``."""
    folder = Path(folder)
    if (folder / SPARSE_FILE).exists() or not (folder / "config.json").exists():
        return PYFUNC
    if is_compressed_tensors(folder) and has_zero_points(folder):
        return PYFUNC
    return TRANSFORMERS


def requirements(folder: str | Path, flavour: str) -> list[str]:
    """Pinned to what wrote the folder. Explicit: MLflow's own inference adds torchvision (not
    installed here) and takes seconds."""
    import torch
    import transformers

    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    if is_compressed_tensors(folder):
        import compressed_tensors

        reqs.append(f"compressed-tensors=={compressed_tensors.__version__}")
    if flavour == PYFUNC:
        from wanda_pipeline import __version__

        reqs.insert(0, f"wanda-pipeline=={__version__}")
    return reqs


def log_folder(folder: str | Path, metadata: dict[str, Any]) -> str:
    """Log ``folder`` to the active run as ``model``; returns the model URI."""
    import mlflow
    from mlflow.models import Model

    flavour = flavour_of(folder)
    common = dict(name="model", signature=generation_signature(), input_example=input_example(),
                  pip_requirements=requirements(folder, flavour), metadata={**metadata, "flavour": flavour})
    if flavour == TRANSFORMERS:
        # From loaded objects: MLflow 3.17's from-a-folder path fails on transformers 5 (it reads
        # the pipeline class's __name__ from a string). Model.log: it alone can skip the serving check.
        info = Model.log(None, flavor=mlflow.transformers, transformers_model=_components(folder),
                         task="text-generation", model_config={"return_full_text": False},
                         validate_serving_input=False, **common)
    else:  # MLflow loads it once to try the input example (its pyfunc offers no way to skip that)
        info = mlflow.pyfunc.log_model(loader_module="wanda_pipeline.mlflow_model", data_path=str(folder), **common)
    return info.model_uri


def _components(folder: str | Path) -> dict[str, Any]:
    """The checkpoint as transformers loads it (a compressed-tensors one stays packed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {"model": AutoModelForCausalLM.from_pretrained(folder), "tokenizer": AutoTokenizer.from_pretrained(folder)}


def model_folders(root: str | Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) inside a downloaded MLflow model: the transformers
    flavour's ``model/`` and ``components/tokenizer/``, or the pyfunc's data folder for both
    (``.`` in versions logged before the transformers flavour)."""
    import yaml

    root = Path(root)
    flavors = yaml.safe_load((root / "MLmodel").read_text())["flavors"]
    if TRANSFORMERS in flavors:
        conf = flavors[TRANSFORMERS]
        return root / conf.get("model_binary", "model"), root / "components" / "tokenizer"
    data = root / flavors["python_function"]["data"]
    return data, data
