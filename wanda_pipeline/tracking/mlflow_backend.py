"""MLflow behind one small class: runs, params, metrics, artifacts, models, registry."""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wanda_pipeline.errors import TrackingError, note_run
from wanda_pipeline.tracking.store_setup import first_setup, tracked

# MLflow's defaults retry a dead server for minutes (7 retries, backoff factor 2, 120 s timeout).
# A pipeline should fail in seconds instead; a user can still set these higher.
for _var, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}.items():
    os.environ.setdefault(_var, _value)

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


class MLflowTracker:
    def __init__(self, uri: str | None = None, experiment: str = "wanda-pipeline"):
        import mlflow

        self.uri = resolve_tracking_uri(uri)
        self.experiment_name = experiment
        self._mlflow = mlflow
        self._client = None
        self._experiment_id: str | None = None

    # ------------------------------------------------------------ setup
    def check(self, registry: bool = False) -> None:
        """Fail fast, before any heavy work, if the backend cannot be reached or written."""
        if self.uri.startswith(("http://", "https://")):
            import requests

            try:
                r = requests.get(self.uri.rstrip("/") + "/health", timeout=3)
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
            from wanda_pipeline.sourcecheck import can_write, can_write_file

            if not can_write(db.parent) or (db.exists() and not can_write_file(db)):
                raise TrackingError(f"the MLflow database {db} (or its folder) is read-only; make it writable, or "
                                    f"set tracking.uri / MLFLOW_TRACKING_URI to a writable sqlite:///PATH")
        self._connect()
        self._check_artifacts()
        if registry:
            try:
                self._client.search_registered_models(max_results=1)
            except Exception as exc:
                raise TrackingError(f"the MLflow model registry at {self.uri} does not answer "
                                    f"({type(exc).__name__}: {str(exc)[:200]}); fix the server, or set "
                                    f"register.enabled: false") from None

    def _check_artifacts(self) -> None:
        location = self._client.get_experiment(self._experiment_id).artifact_location
        if not location.startswith("file:"):
            return  # a server or object store: its own check happened above
        from urllib.parse import unquote, urlparse

        folder = Path(unquote(urlparse(location).path))
        from wanda_pipeline.sourcecheck import can_write

        base = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if base is None or not can_write(base):
            raise TrackingError(f"the MLflow artifact folder {folder} is not writable; fix its permissions or "
                                f"use a new experiment name (tracking.experiment)")

    def _connect(self) -> None:
        if self._client is not None:
            return
        with first_setup(self.uri):
            try:
                self._open()
            except TrackingError:
                raise
            except Exception as exc:
                from wanda_pipeline.fault_map import classify

                mapped = classify(exc, hint=self.uri)
                if mapped is not None:
                    raise mapped from None
                raise TrackingError(f"cannot open MLflow experiment {self.experiment_name!r} at {self.uri}: "
                                    f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def _open(self) -> None:
        """Client, store (a new sqlite file is migrated here), registry store, and the experiment."""
        from mlflow import MlflowClient

        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        client = MlflowClient(self.uri, self.uri)
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                root = Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts"
                location = (root / self.experiment_name).resolve().as_uri()
            self._experiment_id = client.create_experiment(self.experiment_name, artifact_location=location)
        else:
            self._experiment_id = exp.experiment_id
        if self.uri.startswith("sqlite:///"):
            client.search_registered_models(max_results=1)  # the registry's store: set up inside the lock too
        self._client = client

    @property
    def client(self):
        self._connect()
        return self._client

    # ------------------------------------------------------------ runs
    @contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[str]:
        """An MLflow run that always ends: FINISHED, FAILED, or KILLED on a signal (never RUNNING)."""
        self._connect()
        try:
            active = self._mlflow.start_run(experiment_id=self._experiment_id, run_name=name, tags=tags or {},
                                            nested=nested)
        except Exception as exc:
            raise TrackingError(f"cannot start an MLflow run at {self.uri}: {type(exc).__name__}: {exc}") from None
        status, error = "FAILED", None
        try:
            yield active.info.run_id
            status = "FINISHED"
        except Exception as exc:
            error = exc
            raise
        except BaseException as exc:  # our Interrupted, Prefect's TerminationSignal, SystemExit: a signal, not a bug
            status, error = "KILLED", exc
            raise
        finally:
            ended: str | None = status
            try:
                self._mlflow.end_run(status)
            except Exception:  # the server may be the thing that failed; never hide the first error
                ended = None
            if error is not None:  # so the CLI's last line can name the run
                note_run(error, active.info.run_id, self.uri, ended)

    @tracked
    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: ("None" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        self._mlflow.log_params(flat)

    @tracked
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {metric_key(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._mlflow.log_metrics(clean, step=step)

    @tracked
    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @tracked
    def log_dict(self, obj: Any, path: str) -> None:
        self._mlflow.log_dict(obj, path)

    @tracked
    def log_table(self, rows: list[dict], path: str) -> None:
        if not rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        self._mlflow.log_text(buf.getvalue(), path)

    @tracked
    def log_figure(self, fig, path: str) -> None:
        self._mlflow.log_figure(fig, path)

    # ------------------------------------------------------------ models
    @tracked
    def log_model(self, folder: str | Path, metadata: dict[str, Any]) -> str:
        """Log a saved model folder to the active run (transformers flavour for transformers
        checkpoints, this package's pyfunc for bitmask-v1; see :mod:`.model_logging`)."""
        from wanda_pipeline.tracking.model_logging import log_folder

        return log_folder(folder, metadata)

    def load_model(self, uri: str):
        """(model, tokenizer) from ``runs:/...``, ``models:/name@alias`` or ``models:/name/version``."""
        from wanda_pipeline.mlflow_model import load_folder
        from wanda_pipeline.tracking.model_logging import model_folders

        self._connect()
        return load_folder(*model_folders(self._mlflow.artifacts.download_artifacts(artifact_uri=uri)))
