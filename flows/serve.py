"""Entry module: serve the scheduled pipelines (see :mod:`wanda_pipeline.orchestration.serve`)."""

from wanda_pipeline.orchestration.serve import deployments, serve_scheduled

__all__ = ["deployments", "serve_scheduled"]
