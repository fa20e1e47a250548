"""MLflow behind one small class: runs, params, metrics, artifacts, models, registry."""

from __future__ import annotations

import csv
import getpass
import io
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanda_pipeline.errors import TrackingError

_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit setting, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db`` (sqlite, no server)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').as_posix()}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def metric_key(name: str) -> str:
    return _BAD_KEY.sub("_", name)


@dataclass
class Registration:
    name: str
    version: str
    alias: str
    promoted: bool
    gates: list[dict] = field(default_factory=list)
    reason: str = ""


class MLflowTracker:
    def __init__(self, uri: str | None = None, experiment: str = "wanda-pipeline"):
        import mlflow

        self.uri = resolve_tracking_uri(uri)
        self.experiment_name = experiment
        self._mlflow = mlflow
        self._client = None
        self._experiment_id: str | None = None

    # ------------------------------------------------------------ setup
    def check(self) -> None:
        """Fail fast, before any heavy work, if the backend cannot be reached."""
        if self.uri.startswith(("http://", "https://")):
            import requests

            try:
                r = requests.get(self.uri.rstrip("/") + "/health", timeout=5)
                r.raise_for_status()
            except Exception as exc:
                raise TrackingError(
                    f"MLflow tracking server {self.uri} is unreachable ({type(exc).__name__}). Start it "
                    f"(`mlflow server --host 127.0.0.1 --port 5000`), or unset MLFLOW_TRACKING_URI to use the "
                    f"local sqlite file."
                ) from None
        elif self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingError(f"cannot create the MLflow database folder {db.parent}: {exc}") from None
        self._connect()

    def _connect(self) -> None:
        if self._client is not None:
            return
        from mlflow import MlflowClient

        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self._client = MlflowClient(self.uri, self.uri)
        try:
            exp = self._client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:///"):
                    root = Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts"
                    location = (root / self.experiment_name).resolve().as_uri()
                self._experiment_id = self._client.create_experiment(self.experiment_name,
                                                                     artifact_location=location)
            else:
                self._experiment_id = exp.experiment_id
        except Exception as exc:
            raise TrackingError(f"cannot open MLflow experiment {self.experiment_name!r} at {self.uri}: {exc}") from exc

    @property
    def client(self):
        self._connect()
        return self._client

    # ------------------------------------------------------------ runs
    @contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[str]:
        self._connect()
        with self._mlflow.start_run(experiment_id=self._experiment_id, run_name=name, tags=tags or {},
                                    nested=nested) as active:
            yield active.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: ("None" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        self._mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {metric_key(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_dict(self, obj: Any, path: str) -> None:
        self._mlflow.log_dict(obj, path)

    def log_table(self, rows: list[dict], path: str) -> None:
        if not rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        self._mlflow.log_text(buf.getvalue(), path)

    def log_figure(self, fig, path: str) -> None:
        self._mlflow.log_figure(fig, path)

    # ------------------------------------------------------------ models
    def log_model(self, folder: str | Path, metadata: dict[str, Any]) -> str:
        """Log a saved model folder as a pyfunc (loader module, safetensors, no pickle), the folder
        at the model's root so the registered version is directly servable."""
        import torch
        import transformers
        from mlflow.models import Model

        from wanda_pipeline import __version__, mlflow_model

        info = Model.log(
            None,  # artifact_path: deprecated in MLflow 3 but still positional
            name="model",
            flavor=mlflow_model,
            folder=str(folder),
            pip_requirements=[f"wanda-pipeline=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"transformers=={transformers.__version__}"],
            metadata=metadata,
        )
        return info.model_uri

    def load_model(self, uri: str):
        """(model, tokenizer) from ``runs:/...``, ``models:/name@alias`` or ``models:/name/version``."""
        import yaml

        from wanda_pipeline.mlflow_model import load_folder

        self._connect()
        local = Path(self._mlflow.artifacts.download_artifacts(artifact_uri=uri))
        conf = yaml.safe_load((local / "MLmodel").read_text())
        data = conf["flavors"]["python_function"]["data"]
        return load_folder(local / data)

    # ------------------------------------------------------------ registry
    def champion_metrics(self, name: str, alias: str) -> dict[str, float] | None:
        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except Exception:
            return None
        return dict(self.client.get_run(mv.run_id).data.metrics) if mv.run_id else None

    def register(self, model_uri: str, name: str, tags: dict[str, Any]) -> str:
        """Create a model version with tags. On any failure, no half-made version remains."""
        client = self.client
        version = None
        created = False
        try:
            try:
                client.get_registered_model(name)
            except Exception:
                client.create_registered_model(name, description="Sparse models from wanda-pipeline")
                created = True
            run_id = self._mlflow.active_run().info.run_id if self._mlflow.active_run() else None
            # MLflow 3 logged models live at models:/m-<id>; a server insists on the id as well.
            model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
            mv = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
            version = mv.version
            for _ in range(60):
                if client.get_model_version(name, version).status == "READY":
                    break
                time.sleep(0.5)
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, str(v))
            return str(version)
        except Exception as exc:
            try:
                if version is not None:
                    client.delete_model_version(name, version)
                if created:
                    client.delete_registered_model(name)
            except Exception:
                pass
            raise TrackingError(f"registering {name!r} failed and was rolled back: {exc}") from exc

    def promote(self, name: str, version: str, alias: str = "champion", reason: str = "manual promotion",
                manual: bool = True) -> None:
        client = self.client
        try:
            client.get_model_version(name, str(version))
        except Exception:
            raise TrackingError(f"model {name!r} has no version {version} in {self.uri}; "
                                f"check `mlflow ui` or the run summary for the version number") from None
        client.set_registered_model_alias(name, alias, str(version))
        tags = {"promoted_to": alias, "promotion": "manual" if manual else "gates",
                "promotion_reason": reason, "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if manual:
            tags["promoted_by"] = getpass.getuser()
        for k, v in tags.items():
            client.set_model_version_tag(name, str(version), k, v)

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, str(version)).tags)

    def alias_version(self, name: str, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except Exception:
            return None
