"""RIA pruner plugin for wanda-pipeline."""

from wanda_ria.pruner import RIAConfig, RIAPruner, ria_metric

__all__ = ["RIAConfig", "RIAPruner", "ria_metric"]
