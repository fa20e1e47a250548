"""Test doubles for the model registry, for faults a real MLflow server cannot produce on cue.

- :class:`FakeRegistry` stands in for :class:`wanda_pipeline.tracking.registry.ModelRegistry`
  (the four calls promotion makes) and keeps what was registered, tagged and aliased.
- :class:`FakeClient` stands in for the few ``MlflowClient`` calls ``ModelRegistry`` makes, so
  the real ``ModelRegistry`` runs against a server that times out or fails at a chosen call.

A fault is an exception to raise, keyed by the method name; ``FakeRegistry.tag`` is best effort
like the real one (a fault makes it write nothing and return False).
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from wanda_pipeline.errors import TrackingError

CALLS = ("champion_metrics", "champion_examples", "register", "tag", "set_alias")


def nll_examples(ppl: float, windows: int = 24, spread: float = 0.01) -> dict[str, dict]:
    """Per-window results behind a perplexity of exactly ``ppl`` (zero-mean spread around log ppl),
    on one fixed set of windows, as the perplexity evaluator logs them."""
    import math

    wiggle = [spread * ((-1) ** i) * (1 + i % 3) for i in range(windows)]
    shift = sum(wiggle) / windows
    values = [math.log(ppl) + w - shift for w in wiggle]
    return {"ppl_wikitext2": {"kind": "nll", "ids": list(range(windows)), "values": values, "digest": "windows-1"}}


def timeout(call: str) -> TrackingError:
    """What the real ModelRegistry raises when the server does not answer in time."""
    return TrackingError(f"{call}: ReadTimeout: HTTPConnectionPool(host='127.0.0.1'): read timed out")


@dataclass
class FakeRegistry:
    champion: dict[str, float] | None = None  # metrics of the version holding @alias of ``name``
    name: str = "m"
    alias: str = "champion"
    faults: dict[str, BaseException] = field(default_factory=dict)
    versions: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # name -> version -> tags
    uris: dict[tuple[str, str], str] = field(default_factory=dict)
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)  # (name, alias) -> version
    calls: list[str] = field(default_factory=list)
    examples: dict[str, dict] | None = None  # the champion run's per-example results (default: from its ppl)

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(CALLS)
        assert not unknown, f"no such registry call: {unknown}"
        if self.examples is None and self.champion and "ppl_wikitext2" in self.champion:
            self.examples = nll_examples(self.champion["ppl_wikitext2"])

    def _enter(self, call: str) -> None:
        self.calls.append(call)
        if call in self.faults:
            raise self.faults[call]

    def champion_metrics(self, name: str, alias: str) -> dict[str, float] | None:
        self._enter("champion_metrics")
        if self.champion is None or (name, alias) != (self.name, self.alias):
            return None  # another model's or alias's champion: none
        return dict(self.champion)

    def champion_examples(self, name: str, alias: str) -> dict[str, dict] | None:
        self._enter("champion_examples")
        if self.champion is None or (name, alias) != (self.name, self.alias):
            return None
        return self.examples

    def register(self, model_uri: str, name: str, tags: dict[str, Any]) -> str:
        self._enter("register")
        version = str(len(self.versions.get(name, {})) + 1)
        self.versions.setdefault(name, {})[version] = {k: str(v) for k, v in tags.items()}
        self.uris[(name, version)] = model_uri
        return version

    def tag(self, name: str, version: str, tags: dict[str, Any]) -> bool:
        try:
            self._enter("tag")
        except Exception:
            return False
        self.versions[name][str(version)].update({k: str(v) for k, v in tags.items()})
        return True

    def set_alias(self, name: str, version: str, alias: str, reason: str, manual: bool) -> None:
        self._enter("set_alias")
        self.aliases[(name, alias)] = str(version)
        self.tag(name, version, {"promoted_to": alias, "promotion": "manual" if manual else "gates",
                                 "promotion_reason": reason})


class FakeClient:
    """The ``MlflowClient`` calls ``ModelRegistry`` makes, against dicts. ``faults`` maps a client
    method name to an exception; ``status`` is what ``get_model_version`` reports."""

    def __init__(self, faults: dict[str, BaseException] | None = None, status: str = "READY",
                 champion: dict[str, float] | None = None):
        self.faults = dict(faults or {})
        self.status = status
        self.models: set[str] = set()
        self.versions: dict[tuple[str, str], dict[str, str]] = {}
        self.aliases: dict[tuple[str, str], str] = {}
        self.runs: dict[str, dict[str, float]] = {}
        self.sources: dict[tuple[str, str], str] = {}  # what each version was registered from
        self.calls: list[str] = []
        self.artifacts: dict[str, dict] = {}  # run id -> the per-example document it logged
        if champion is not None:
            self.models.add("m")
            self.versions[("m", "1")] = {}
            self.runs["run-1"] = dict(champion)
            self.aliases[("m", "champion")] = "1"
            if "ppl_wikitext2" in champion:
                from wanda_pipeline.per_example import document

                self.artifacts["run-1"] = document(nll_examples(champion["ppl_wikitext2"]))

    def _enter(self, call: str) -> None:
        self.calls.append(call)
        if call in self.faults:
            raise self.faults[call]

    @staticmethod
    def _missing(what: str) -> Exception:
        exc = Exception(f"{what} not found")
        exc.error_code = "RESOURCE_DOES_NOT_EXIST"
        return exc

    def get_model_version_by_alias(self, name, alias):
        self._enter("get_model_version_by_alias")
        if (name, alias) not in self.aliases:
            raise self._missing(f"alias {alias}")
        v = self.aliases[(name, alias)]
        return SimpleNamespace(version=v, run_id=f"run-{v}")

    def get_run(self, run_id):
        self._enter("get_run")
        return SimpleNamespace(data=SimpleNamespace(metrics=self.runs[run_id]))

    def list_artifacts(self, run_id):
        self._enter("list_artifacts")
        from wanda_pipeline.per_example import ARTIFACT

        return [SimpleNamespace(path=ARTIFACT)] if run_id in self.artifacts else []

    def download_artifacts(self, run_id, path, dst):
        import json

        self._enter("download_artifacts")
        out = Path(dst) / path
        out.write_text(json.dumps(self.artifacts[run_id]))
        return str(out)

    def get_registered_model(self, name):
        self._enter("get_registered_model")
        if name not in self.models:
            raise self._missing(f"registered model {name}")

    def create_registered_model(self, name, description=""):
        self._enter("create_registered_model")
        self.models.add(name)

    def create_model_version(self, name, source, run_id=None, model_id=None):
        self._enter("create_model_version")
        version = str(sum(1 for n, _ in self.versions if n == name) + 1)
        self.versions[(name, version)] = {}
        self.sources[(name, version)] = source
        return SimpleNamespace(version=version)

    def get_model_version(self, name, version):
        self._enter("get_model_version")
        if (name, str(version)) not in self.versions:
            raise self._missing(f"version {version}")
        return SimpleNamespace(status=self.status)

    def set_model_version_tag(self, name, version, key, value):
        self._enter("set_model_version_tag")
        self.versions[(name, str(version))][key] = value

    def delete_model_version(self, name, version):
        self._enter("delete_model_version")
        self.versions.pop((name, str(version)), None)
        self.aliases = {k: v for k, v in self.aliases.items() if not (k[0] == name and v == str(version))}

    def delete_registered_model(self, name):
        self._enter("delete_registered_model")
        self.models.discard(name)

    def set_registered_model_alias(self, name, alias, version):
        self._enter("set_registered_model_alias")
        self.aliases[(name, alias)] = str(version)


class FakeTracker:
    """What ``ModelRegistry`` reads from a tracker: ``client``, ``uri`` and ``_mlflow.active_run()``."""

    uri = "http://fake-registry:5000"

    def __init__(self, client: FakeClient):
        self.client = client
        self._mlflow = SimpleNamespace(active_run=lambda: None)


class RecordingTracker(FakeTracker):
    """A tracker for ``run.execute``: keeps what would be logged, logs the model folder's file
    names, and registers through :class:`FakeClient`."""

    def __init__(self, client: FakeClient):
        super().__init__(client)
        self.logged: dict[str, list] = defaultdict(list)
        self.model_files: list[str] = []

    def check(self, registry: bool = False) -> None:
        pass

    @contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, nested: bool = False):
        self.logged["run"].append((name, dict(tags or {})))
        self.logged["nested"].append(nested)
        yield "run-under-test"

    def log_model(self, folder, metadata: dict[str, Any]) -> str:
        self.model_files = sorted(p.name for p in Path(folder).iterdir())
        self.logged["model_metadata"].append(metadata)
        for name in ("wanda_provenance.json", "config.json"):  # what a served version would carry
            if (Path(folder) / name).is_file():
                self.logged[name].append(json.loads((Path(folder) / name).read_text()))
        return "models:/m-under-test"

    def __getattr__(self, name: str):  # log_params, log_metrics, set_tags, log_dict, log_table, log_figure
        if not name.startswith(("log_", "set_")):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.logged[name].append(args)
