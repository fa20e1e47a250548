"""MLflow pyfunc loader module for pruned models (``loader_module``: no pickle).

Registered ``bitmask-v1`` folders (values + bitmask, see :func:`wanda_pipeline.saving.save_sparse`)
need it, so serving them needs this package installed. Transformers checkpoints (hf,
compressed-tensors) are logged with MLflow's own transformers flavour instead
(:mod:`wanda_pipeline.tracking.model_logging`); :func:`load_folder` still reads every format.
"""

from __future__ import annotations

import json
from pathlib import Path

from wanda_pipeline.saving import SPARSE_FILE, load_sparse

# Generation parameters a client may send with a request (MLflow ``params``), with their
# defaults; the signature of every registered model declares exactly these.
GENERATION_DEFAULTS: dict[str, int | float | bool] = {
    "max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50,
    "repetition_penalty": 1.0,
}


def is_compressed_tensors(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    quant = json.loads(cfg.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors"


def load_folder(path: str | Path, tokenizer_path: str | Path | None = None):
    """(model, tokenizer) from a saved folder, any format (the tokenizer from ``tokenizer_path``
    if given: MLflow's transformers flavour keeps it apart)."""
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
    return model, AutoTokenizer.from_pretrained(tokenizer_path or path)


class PrunedLM:
    """What ``mlflow.pyfunc.load_model`` returns: generates text for prompts, honouring the
    generation params of the signature (greedy by default)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def predict(self, model_input, params=None) -> list[str]:
        import torch

        if hasattr(model_input, "columns"):  # a DataFrame: the signature's one string column
            prompts = [str(p) for p in model_input.iloc[:, 0]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        gen = {**GENERATION_DEFAULTS, **(params or {})}
        if not gen["do_sample"]:  # sampling knobs mean nothing when greedy (and transformers warns)
            gen = {k: v for k, v in gen.items() if k not in ("temperature", "top_p", "top_k")}
        out = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                tokens = self.model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
            out.append(self.tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def _load_pyfunc(data_path: str) -> PrunedLM:
    return PrunedLM(*load_folder(data_path))
