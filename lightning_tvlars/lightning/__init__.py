"""Lightning integration: config, helper, mixin, scaling, monitor and strategy checks."""

from lightning_tvlars.lightning.config import TVLARSConfig
from lightning_tvlars.lightning.mixin import (
    EffectiveBatchScaling,
    TVLARSMixin,
    TVLARSPlan,
    configure_tvlars,
)
from lightning_tvlars.lightning.monitor import TVLARSMonitor
from lightning_tvlars.lightning.scaling import effective_batch_size, scaled_lr

__all__ = [
    "EffectiveBatchScaling",
    "TVLARSConfig",
    "TVLARSMixin",
    "TVLARSMonitor",
    "TVLARSPlan",
    "configure_tvlars",
    "effective_batch_size",
    "scaled_lr",
]
