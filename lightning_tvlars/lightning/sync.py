"""``ScheduleSync``: keeps every :class:`~lightning_tvlars.TVLARSScheduler` true to the run.

The plan made in ``configure_optimizers`` is an estimate; this callback re-reads the run
(:class:`~lightning_tvlars.lightning.run.RunFacts`) at fit start (after a checkpoint is
restored, with the number of optimizers known) and at every epoch start (accumulation
schedules, reloaded data loaders), and hands it to
:meth:`~lightning_tvlars.TVLARSScheduler.plan_for`, which re-plans without a jump. Every change
is logged in one line. It holds no state of its own: the plan lives in the scheduler, which
Lightning saves and restores. :func:`~lightning_tvlars.configure_tvlars` adds it to the trainer
if it is missing.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from lightning_tvlars.lightning.run import RunFacts
from lightning_tvlars.lightning.scaling import scaled_lr
from lightning_tvlars.schedule import TVLARSScheduler


def describe_batch(facts: RunFacts, base_lr: float, lr: float, config: Any) -> str:
    """One plain sentence about how the batch size and learning rate were resolved."""
    batch, base = facts.effective_batch_size, config.base_batch_size
    how = {
        "linear": f"x {batch}/{base}",
        "sqrt": f"x sqrt({batch}/{base})",
        "none": "(no scaling)",
    }[config.lr_scaling]
    return (
        f"TVLARS: effective batch size {batch} = {facts.per_device_batch_size} per device x "
        f"{facts.replicas} data-parallel replica(s) x {facts.accumulation} accumulated "
        f"batch(es); learning rate {lr:.6g} = {base_lr:.6g} {how} ({config.lr_scaling} scaling)."
    )


class ScheduleSync(pl.Callback):
    """Re-plans TVLARS schedules when the run differs from the plan (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # id(scheduler) -> (scheduler, config with lr_scaling/base_batch_size, batch size or None)
        self._schedules: dict[int, tuple[TVLARSScheduler, Any, int | None]] = {}

    @classmethod
    def register(
        cls, trainer: pl.Trainer, scheduler: TVLARSScheduler, config: Any, batch_size: int | None
    ) -> ScheduleSync:
        """Follow ``scheduler`` with the trainer's ``ScheduleSync`` (added if missing)."""
        sync = next((c for c in trainer.callbacks if isinstance(c, cls)), None)  # type: ignore[attr-defined]
        if sync is None:
            sync = cls()
            trainer.callbacks.append(sync)  # type: ignore[attr-defined]
        sync._schedules[id(scheduler)] = (scheduler, config, batch_size)
        return sync

    def _live(self, trainer: pl.Trainer) -> list[tuple[TVLARSScheduler, Any, int | None]]:
        live = {id(c.scheduler) for c in trainer.lr_scheduler_configs}
        self._schedules = {k: v for k, v in self._schedules.items() if k in live}
        return list(self._schedules.values())

    def _sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = 1 if pl_module.automatic_optimization else len(trainer.optimizers)
        for scheduler, config, batch_size in self._live(trainer):
            facts = RunFacts.from_trainer(trainer, batch_size, optimizers)
            scale = scaled_lr(
                1.0, facts.effective_batch_size, config.base_batch_size, config.lr_scaling
            )
            scheduler.plan_for(facts.total_steps, scale, facts.effective_batch_size)
            for change in scheduler.changes:
                rank_zero_info(f"TVLARS re-planned: {change}.")
            scheduler.changes.clear()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer, pl_module)


def guard_lr_sweeps(optimizer: Optimizer, scheduler: TVLARSScheduler, trainer: pl.Trainer) -> None:
    """Hold the phase while Lightning's LR finder sweeps the learning rate.

    The finder replaces the trainer's callbacks and schedulers for the sweep; an optimizer hook
    is what still runs. Without it the phase would decay during the sweep and high rates would
    be tried with phi near its floor.
    """
    state = {"held": False}

    def hold_during_sweep(opt: Optimizer, args: Any, kwargs: Any) -> None:
        sweeping = any(type(c).__name__ == "_LRCallback" for c in trainer.callbacks)  # type: ignore[attr-defined]
        if sweeping != state["held"]:
            scheduler.hold_phase(sweeping)
            state["held"] = sweeping

    optimizer.register_step_pre_hook(hold_during_sweep)
