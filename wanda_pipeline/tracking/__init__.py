"""Tracking: the one place that knows MLflow. ``gates`` and ``promotion.decide`` are pure."""

from wanda_pipeline.tracking.gates import GateResult, evaluate_gates
from wanda_pipeline.tracking.mlflow_backend import MLflowTracker, resolve_tracking_uri
from wanda_pipeline.tracking.promotion import Registration, decide, register_and_promote
from wanda_pipeline.tracking.registry import ModelRegistry

__all__ = ["GateResult", "MLflowTracker", "ModelRegistry", "Registration", "decide", "evaluate_gates",
           "register_and_promote", "resolve_tracking_uri"]
