"""lightning-tvlars: the TVLARS optimizer (arXiv 2309.14053) for PyTorch and PyTorch Lightning.

The optimizer core imports only torch; the Lightning names load Lightning on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_tvlars.metrics import tvlars_metrics
from lightning_tvlars.optim import (
    TVLARS,
    GroupOverride,
    TVLARSStepStats,
    param_groups,
    trust_ratio,
)
from lightning_tvlars.phase import ConstantPhase, SigmoidPhase
from lightning_tvlars.schedule import FittedPhase, TVLARSScheduler
from lightning_tvlars.sharpness import SharpnessReport, measure_sharpness

__version__ = "0.1.0"

_LIGHTNING_NAMES = (
    "EndProcessGroupAtExit",
    "PhaseConfig",
    "RunFacts",
    "ScheduleSync",
    "SharpnessProbe",
    "TVLARSConfig",
    "TVLARSMixin",
    "TVLARSMonitor",
    "configure_tvlars",
    "effective_batch_size",
    "scaled_lr",
)

__all__ = [
    "TVLARS",
    "ConstantPhase",
    "FittedPhase",
    "GroupOverride",
    "SharpnessReport",
    "SigmoidPhase",
    "TVLARSScheduler",
    "TVLARSStepStats",
    "__version__",
    "measure_sharpness",
    "param_groups",
    "trust_ratio",
    "tvlars_metrics",
    *_LIGHTNING_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        return getattr(importlib.import_module("lightning_tvlars.lightning"), name)
    raise AttributeError(f"module 'lightning_tvlars' has no attribute {name!r}")
