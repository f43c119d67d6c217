"""Lightning integration: config, helper, mixin, schedule sync, monitor, strategy checks and the
process group's end."""

from lightning_tvlars.lightning.config import PhaseConfig, TVLARSConfig
from lightning_tvlars.lightning.configure import configure_tvlars
from lightning_tvlars.lightning.mixin import TVLARSMixin
from lightning_tvlars.lightning.monitor import TVLARSMonitor
from lightning_tvlars.lightning.run import RunFacts
from lightning_tvlars.lightning.scaling import effective_batch_size, scaled_lr
from lightning_tvlars.lightning.sharpness import SharpnessProbe
from lightning_tvlars.lightning.sync import ScheduleSync
from lightning_tvlars.lightning.teardown import EndProcessGroupAtExit

__all__ = [
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
]
