"""MLflow pyfunc loader module for pruned models (``loader_module`` flavour: no pickle).

The model's data folder is either a ``save_pretrained`` folder or a bitmask-compressed
folder from :func:`wanda_pipeline.saving.save_sparse`.
"""

from __future__ import annotations

from pathlib import Path

from wanda_pipeline.saving import SPARSE_FILE, load_sparse


def load_folder(path: str | Path):
    """(model, tokenizer) from a saved folder, either format."""
    path = Path(path)
    if (path / SPARSE_FILE).exists():
        return load_sparse(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
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
