"""Tracking: the one place that knows MLflow. ``gates`` is pure and MLflow-free."""

from wanda_pipeline.tracking.gates import GateResult, evaluate_gates
from wanda_pipeline.tracking.mlflow_backend import MLflowTracker, Registration, resolve_tracking_uri

__all__ = ["GateResult", "MLflowTracker", "Registration", "evaluate_gates", "resolve_tracking_uri"]
