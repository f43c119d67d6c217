"""The trust-ratio family: TVLARS and LAMB, their shared steps, parameter groups and norms."""

from lightning_tvlars.optim.groups import NORM_LAYERS, GroupOverride, param_groups
from lightning_tvlars.optim.lamb import LAMB
from lightning_tvlars.optim.trust import StepStats, trust_ratio
from lightning_tvlars.optim.tvlars import TVLARS

#: The former name of :class:`StepStats`.
TVLARSStepStats = StepStats

__all__ = [
    "LAMB",
    "NORM_LAYERS",
    "TVLARS",
    "GroupOverride",
    "StepStats",
    "TVLARSStepStats",
    "param_groups",
    "trust_ratio",
]
