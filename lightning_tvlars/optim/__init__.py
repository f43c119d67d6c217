"""Optimizer core: the TVLARS update, parameter groups and layer-wise norms."""

from lightning_tvlars.optim.groups import NORM_LAYERS, GroupOverride, param_groups
from lightning_tvlars.optim.stats import TVLARSStepStats
from lightning_tvlars.optim.tvlars import TVLARS, trust_ratio

__all__ = [
    "NORM_LAYERS",
    "TVLARS",
    "GroupOverride",
    "TVLARSStepStats",
    "param_groups",
    "trust_ratio",
]
