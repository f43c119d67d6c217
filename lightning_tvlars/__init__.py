"""lightning-tvlars: the trust-ratio family (TVLARS, arXiv 2309.14053, and LAMB, each with or
without a decaying phase) for PyTorch, PyTorch Lightning, Fabric and timm.

The optimizers, the schedule and the recipe import only torch; the Lightning names load
Lightning on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_tvlars import recipe
from lightning_tvlars.fabric import configure_tvlars_fabric
from lightning_tvlars.metrics import tvlars_metrics
from lightning_tvlars.optim import LAMB, TVLARS, GroupOverride, param_groups
from lightning_tvlars.optim.timm_registry import register_with_timm
from lightning_tvlars.phase import SigmoidPhase
from lightning_tvlars.recipe import PhaseConfig, RunFacts, TVLARSConfig, build
from lightning_tvlars.schedule import FittedPhase, TVLARSScheduler
from lightning_tvlars.sharpness import measure_sharpness

__version__ = "0.1.0"

#: Loaded with Lightning, on first use.
_LIGHTNING_NAMES = ("SharpnessProbe", "TVLARSMixin", "TVLARSMonitor", "configure_tvlars")

__all__ = [
    "LAMB",
    "TVLARS",
    "FittedPhase",
    "GroupOverride",
    "PhaseConfig",
    "RunFacts",
    "SigmoidPhase",
    "TVLARSConfig",
    "TVLARSScheduler",
    "__version__",
    "build",
    "configure_tvlars_fabric",
    "measure_sharpness",
    "param_groups",
    "recipe",
    "register_with_timm",
    "tvlars_metrics",
    *_LIGHTNING_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        return getattr(importlib.import_module("lightning_tvlars.lightning"), name)
    raise AttributeError(f"module 'lightning_tvlars' has no attribute {name!r}")
