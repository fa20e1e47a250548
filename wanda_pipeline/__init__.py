"""wanda-pipeline: prune LLMs with Wanda and friends, reproducibly."""

__version__ = "0.1.0"
