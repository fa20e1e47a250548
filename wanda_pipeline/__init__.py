"""wanda-pipeline: prune LLMs with Wanda and friends, reproducibly."""

__version__ = "0.1.0"

from wanda_pipeline.settings import service_defaults  # noqa: E402

service_defaults()
