"""Entry module for the Prefect flows (``prefect deploy flows/compress.py:compress``).

The flow code lives in :mod:`wanda_pipeline.orchestration`; this folder is not installed as
a package, so nothing named plainly ``flows`` lands in site-packages."""

from wanda_pipeline.orchestration.compress import compress, prefect_stage
from wanda_pipeline.orchestration.sweep import sweep

__all__ = ["compress", "prefect_stage", "sweep"]
