"""The model registry behind one small interface. Every call either does what it says or
raises :class:`TrackingError`; nothing here turns an error into "no champion"."""

from __future__ import annotations

import getpass
import time
from typing import Any

from wanda_pipeline.errors import TrackingError


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or \
        "not found" in str(exc).lower() and "alias" in str(exc).lower()


class ModelRegistry:
    def __init__(self, tracker):
        self.tracker = tracker

    @property
    def client(self):
        return self.tracker.client

    def champion_metrics(self, name: str, alias: str) -> dict[str, float] | None:
        """The metrics of the version that holds ``alias``; None only when there is none.
        Any other error (server down, permissions) raises: promotion must fail closed."""
        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise TrackingError(f"cannot read the current @{alias} of {name!r} from {self.tracker.uri}: "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        try:
            return dict(self.client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
        except Exception as exc:
            raise TrackingError(f"cannot read the metrics of @{alias} (run {mv.run_id}): {exc}") from exc

    def champion_examples(self, name: str, alias: str) -> dict[str, dict] | None:
        """The per-example results logged with the run of the version that holds ``alias``; None when
        that run has none (an older run). Errors reading them raise: promotion fails closed."""
        import json
        import tempfile

        from wanda_pipeline.per_example import ARTIFACT, from_document

        try:
            run_id = self.client.get_model_version_by_alias(name, alias).run_id
            if not run_id or ARTIFACT not in {f.path for f in self.client.list_artifacts(run_id)}:
                return None
            with tempfile.TemporaryDirectory(prefix="wanda-champion-") as tmp:
                local = self.client.download_artifacts(run_id, ARTIFACT, tmp)
                with open(local, encoding="utf-8") as fh:
                    doc = json.load(fh)
        except Exception as exc:
            raise TrackingError(f"cannot read the per-example results of @{alias} of {name!r} from "
                                f"{self.tracker.uri}: {type(exc).__name__}: {str(exc)[:200]}") from exc
        return from_document(doc)

    def register(self, model_uri: str, name: str, tags: dict[str, Any]) -> str:
        """Create a model version with tags. On any failure (signals too), no half-made version remains."""
        client = self.client
        version = None
        created = False
        try:
            try:
                client.get_registered_model(name)
            except Exception as exc:
                if not _not_found(exc) and "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                    raise
                client.create_registered_model(name, description="Sparse models from wanda-pipeline")
                created = True
            mlflow = self.tracker._mlflow
            run_id = mlflow.active_run().info.run_id if mlflow.active_run() else None
            # MLflow 3 logged models live at models:/m-<id>; a server insists on the id as well.
            model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
            mv = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
            version = mv.version
            for _ in range(60):
                status = client.get_model_version(name, version).status
                if status == "READY":
                    break
                if status == "FAILED_REGISTRATION":
                    raise TrackingError(f"version {version} is {status}")
                time.sleep(0.5)
            else:  # never tag or promote a version the registry has not finished making
                raise TrackingError(f"version {version} is still {status} after 30 s")
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, str(v))
            return str(version)
        except BaseException as exc:
            try:
                if version is not None:
                    client.delete_model_version(name, version)
                if created:
                    client.delete_registered_model(name)
            except Exception:
                pass
            if not isinstance(exc, Exception):  # a signal: roll back, then let it through
                raise
            raise TrackingError(f"registering {name!r} failed and was rolled back: {exc}") from exc

    def tag(self, name: str, version: str, tags: dict[str, Any]) -> bool:
        """Best effort (used while failing): True if every tag was written."""
        try:
            for k, v in tags.items():
                self.client.set_model_version_tag(name, str(version), k, str(v)[:5000])
            return True
        except Exception:
            return False

    def set_alias(self, name: str, version: str, alias: str, reason: str, manual: bool) -> None:
        client = self.client
        try:
            client.get_model_version(name, str(version))
        except Exception:
            raise TrackingError(f"model {name!r} has no version {version} in {self.tracker.uri}; "
                                f"check `mlflow ui` or the run summary for the version number") from None
        try:
            client.set_registered_model_alias(name, alias, str(version))
        except Exception as exc:
            raise TrackingError(f"could not set @{alias} on {name!r} v{version}: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from exc
        tags = {"promoted_to": alias, "promotion": "manual" if manual else "gates", "promotion_reason": reason,
                "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if manual:
            tags["promoted_by"] = getpass.getuser()
        self.tag(name, str(version), tags)
