"""A tiny pipeline for the wiring tests: the tiny model, a calibration text, a pipelines.yaml
document, and a stage runner that keeps what each stage got and gave."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from wanda_pipeline import stages
from wanda_pipeline.pipelines_file import apply_overrides, parse_document
from wanda_pipeline.plugins import discover
from wanda_pipeline.run import execute

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex my jovial box".split()


def write_text(path: Path) -> Path:
    path.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(80)) for i in range(40)))
    return path


def document(tiny_dir, text) -> dict:
    return {"pipelines": {"p": {
        "model": {"source": str(tiny_dir)},
        "calibration": {"source": str(text), "nsamples": 4, "seqlen": 16, "seed": 0},
        "pruner": {"name": "wanda", "sparsity": 0.5},
        "evaluators": [{"name": "sparsity"}], "dense_baseline": False, "register": {"enabled": False}}}}


class Spy:
    """A stage runner that keeps each stage's arguments and result, and the engine the prune
    stage builds."""

    def __init__(self, monkeypatch):
        self.names, self.args, self.results, self.engines = [], {}, {}, []
        real = stages.make_engine
        monkeypatch.setattr(stages, "make_engine", lambda *a, **k: self.engines.append(real(*a, **k)) or
                            self.engines[-1])

    def __call__(self, name, fn, *args, cache_key=None):
        self.names.append(name)
        self.args[name] = args
        self.results[name] = fn(*args)
        return self.results[name]


def run_yaml(tiny_dir, text, monkeypatch, overrides: list[str]):
    doc = parse_document(yaml.safe_load(json.dumps(document(tiny_dir, text))), discover())
    spec = apply_overrides(doc.pipelines["p"], overrides, "pipelines.p")
    spy = Spy(monkeypatch)
    result = execute(spec, pipeline="p", run_stage=spy, progress=False)
    return spec, spy, result
