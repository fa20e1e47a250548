"""MLflow pyfunc loader module for pruned models (``loader_module`` flavour: no pickle),
and the flavour that logs them (:func:`save_model`, for ``mlflow.models.Model.log``).

The model folder (a ``save_pretrained`` folder, a compressed-tensors export from
:mod:`wanda_pipeline.export.compressed_tensors`, or a bitmask folder from
:func:`wanda_pipeline.saving.save_sparse`) *is* the MLflow model's root, next to ``MLmodel``:
a download of ``models:/NAME@champion`` is a folder ``vllm serve`` or ``from_pretrained`` take.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from wanda_pipeline.saving import SPARSE_FILE, load_sparse


def save_model(path: str, mlflow_model=None, folder: str | Path | None = None,
               pip_requirements: list[str] | None = None, **_kwargs) -> None:
    """Flavour hook for ``Model.log(flavor=this module, folder=...)``: copy ``folder`` to the
    model root and describe it as a pyfunc whose data is the root itself."""
    import mlflow.pyfunc
    from mlflow.models import Model

    root = Path(path)
    shutil.copytree(folder, root, dirs_exist_ok=True)
    (root / "requirements.txt").write_text("\n".join(pip_requirements or []) + "\n")
    mlflow_model = mlflow_model or Model()
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=__name__, data=".")
    mlflow_model.save(str(root / "MLmodel"))


def is_compressed_tensors(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    quant = json.loads(cfg.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors"


def load_folder(path: str | Path):
    """(model, tokenizer) from a saved folder, any format."""
    path = Path(path)
    if (path / SPARSE_FILE).exists():
        return load_sparse(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if is_compressed_tensors(path):
        from transformers import CompressedTensorsConfig

        # Decompress while loading: with compressed-tensors 0.20 and transformers 5.23 the
        # default (decompress on first forward) cannot load asymmetric zero points.
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


class PrunedLM:
    """What ``mlflow.pyfunc.load_model`` returns: generates text for prompts."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def predict(self, model_input, params=None):
        import torch

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        max_new = int((params or {}).get("max_new_tokens", 32))
        out = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = self.model.generate(ids, max_new_tokens=max_new, do_sample=False)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def _load_pyfunc(data_path: str) -> PrunedLM:
    return PrunedLM(*load_folder(data_path))
