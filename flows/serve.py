"""Entry module: serve the scheduled pipelines (see :mod:`wanda_pipeline.orchestration.serve`)."""

from wanda_pipeline.orchestration.serve import deploy_scheduled, deployments, serve_scheduled

__all__ = ["deploy_scheduled", "deployments", "serve_scheduled"]
