"""Optimizer core: the TVLARS update, parameter groups and layer-wise norms."""

from lightning_tvlars.optim.groups import NORM_LAYERS, param_groups
from lightning_tvlars.optim.tvlars import TVLARS, TVLARSStepStats, trust_ratio

__all__ = ["NORM_LAYERS", "TVLARS", "TVLARSStepStats", "param_groups", "trust_ratio"]
