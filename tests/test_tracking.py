"""Tracking backend behaviour against a real MLflow sqlite store."""

import time

import pytest

from tests.conftest import free_port
from wanda_pipeline.errors import TrackingError
from wanda_pipeline.tracking import MLflowTracker, ModelRegistry, resolve_tracking_uri
from wanda_pipeline.tracking.mlflow_backend import flatten, metric_key


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri() == "http://example:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_unreachable_server_fails_fast():
    tracker = MLflowTracker(f"http://127.0.0.1:{free_port()}", "x")
    t0 = time.time()
    with pytest.raises(TrackingError, match="unreachable.*mlflow server"):
        tracker.check()
    assert time.time() - t0 < 30


def test_failed_registration_leaves_nothing_behind(tmp_path):
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'm.db'}", "x")
    tracker.check()
    with tracker.run("r"):
        with pytest.raises(TrackingError, match="rolled back"):
            ModelRegistry(tracker).register("runs:/abc/model", "half-made", {"bad/../key": "x"})
    assert tracker.client.search_model_versions("name='half-made'") == []
    assert tracker.client.search_registered_models() == []


def test_params_and_metric_names_are_made_safe():
    assert flatten({"a": {"b": 1, "c": {"d": None}}}) == {"a.b": 1, "a.c.d": None}
    assert metric_key("ppl(wikitext2)@512") == "ppl_wikitext2__512"
