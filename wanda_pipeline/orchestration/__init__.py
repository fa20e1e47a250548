"""Prefect at the edge: each stage of :func:`wanda_pipeline.run.execute` becomes a task."""
