"""Run the Wanda paper's own pruning code (locuslab/wanda) from a local checkout, as a speed
and exactness baseline. Nothing of that code is copied here: this module imports it from
``$WANDA_REFERENCE_DIR`` and applies, at run time, the few patches it needs to run on CPU
with transformers 5, each for one reason:

1. its C4 loader reads ``allenai/c4`` from the hub: ``lib.prune.get_loaders`` returns the
   product's calibration windows instead (the same windows every other row prunes with);
2. ``model.hf_device_map`` exists only after accelerate's ``device_map="auto"`` on GPUs: set
   to ``{}`` (the whole model on the CPU);
3. ``model.seqlen`` is the config's maximum positions (8192 on SmolLM2): set to the
   calibration sequence length;
4. transformers 5 decoder layers need the rotary ``position_embeddings``, which its Catcher
   does not keep: a forward pre-hook on each decoder layer computes them from the
   ``position_ids`` it does pass (the cost of recomputing them per call is counted).

Get a checkout with ``git clone https://github.com/locuslab/wanda`` (tested at 8e8fc87).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ENV = "WANDA_REFERENCE_DIR"


def reference_dir() -> Path | None:
    """The checkout named by ``$WANDA_REFERENCE_DIR``; None when unset; a clear error when wrong."""
    value = os.environ.get(ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path / "lib" / "prune.py").is_file():
        raise SystemExit(f"{ENV}={value}: no lib/prune.py there. Point it at a checkout of "
                         "https://github.com/locuslab/wanda (git clone it), or unset it to skip the paper-code row.")
    return path


def commit(path: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _add_position_embeddings(model):
    rotary = model.model.rotary_emb

    def hook(module, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            kwargs["position_embeddings"] = rotary(args[0], kwargs["position_ids"])
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]


def paper_prune(model, tokens: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, path: Path) -> float:
    """Prune ``model`` in place with ``lib.prune.prune_wanda`` on ``tokens`` (nsamples x seqlen);
    returns its wall time in seconds."""
    sys.path.insert(0, str(path))
    import lib.prune as paper  # noqa: PLC0415  (the checkout's module, on purpose)

    nsamples, seqlen = tokens.shape
    if nsamples > 128:
        raise SystemExit("the paper code preallocates 128 calibration sequences: use --nsamples <= 128")
    windows = [(tokens[j : j + 1], None) for j in range(nsamples)]
    paper.get_loaders = lambda *a, **k: (windows, None)  # patch 1
    model.hf_device_map = {}  # patch 2
    model.seqlen = seqlen  # patch 3
    handles = _add_position_embeddings(model)  # patch 4
    n, m = nm or (0, 0)
    args = SimpleNamespace(nsamples=nsamples, seed=0, sparsity_ratio=sparsity, use_variant=False)
    try:
        start = time.perf_counter()
        paper.prune_wanda(args, model, None, torch.device("cpu"), prune_n=n, prune_m=m)
        return time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
