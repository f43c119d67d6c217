"""lightning-tvlars: the TVLARS optimizer (arXiv 2309.14053) for PyTorch and PyTorch Lightning."""

from lightning_tvlars.optim import TVLARS, TVLARSStepStats, param_groups, trust_ratio
from lightning_tvlars.phase import SigmoidPhase

__version__ = "0.1.0"

__all__ = [
    "TVLARS",
    "SigmoidPhase",
    "TVLARSStepStats",
    "__version__",
    "param_groups",
    "trust_ratio",
]
