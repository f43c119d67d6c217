"""Lightning adapters: ``configure_tvlars``, the mixin, the schedule's sync, the monitor, the
sharpness probe and the process group's end; each describes the Trainer's run to the recipe
(:mod:`lightning_tvlars.recipe`)."""

from lightning_tvlars.lightning.configure import configure_tvlars
from lightning_tvlars.lightning.mixin import TVLARSMixin
from lightning_tvlars.lightning.monitor import TVLARSMonitor
from lightning_tvlars.lightning.sharpness import SharpnessProbe
from lightning_tvlars.lightning.sync import ScheduleSync
from lightning_tvlars.lightning.teardown import EndProcessGroupAtExit

__all__ = [
    "EndProcessGroupAtExit",
    "ScheduleSync",
    "SharpnessProbe",
    "TVLARSMixin",
    "TVLARSMonitor",
    "configure_tvlars",
]
