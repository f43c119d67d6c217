"""``ScheduleSync``: keeps every :class:`~lightning_tvlars.TVLARSScheduler` true to the real run.

The plan made in ``configure_optimizers`` is an estimate. This callback re-reads the run
(:func:`~lightning_tvlars.lightning.run.run_facts`) and hands it to
:meth:`~lightning_tvlars.TVLARSScheduler.plan_for`, which re-plans without a jump:

* at fit start, after a checkpoint is restored and with the number of optimizers known (a
  resume into a longer run, onto more devices, with another batch);
* at every epoch start (accumulation schedules, data loaders reloaded with another length:
  a change of the epoch's length is warned about once, naming ``total_steps``);
* with ``Trainer(max_time=...)``, from the measured rate of the steps, so that the phase and
  the annealing reach their end when the time runs out (every 5% of the budget, from the 10th
  step);

and logs every change in one line, the changes made when a checkpoint was loaded included. It
refuses, before the first step, a second learning-rate scheduler on an optimizer whose rate a
TVLARSScheduler owns, and ends the fit with one line per schedule: the last phase and
learning rate against the plan. It holds no state of its own: the plan lives in the scheduler,
which Lightning saves and restores. :func:`~lightning_tvlars.configure_tvlars` adds it to the
trainer if it is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_tvlars.lightning.run import run_facts, time_budget
from lightning_tvlars.recipe import RunFacts, TVLARSConfig
from lightning_tvlars.schedule import TVLARSScheduler

#: Re-plan a time budget after this many steps, then every this fraction of it.
TIME_FIRST_STEPS, TIME_EVERY = 10, 0.05


@dataclass
class _Followed:
    """A schedule this callback keeps true, and what it needs to read the run for it."""

    scheduler: TVLARSScheduler
    config: TVLARSConfig
    batch_size: int | None
    epoch_length: float | None = None
    warned_length: bool = False
    started: tuple[float, int] | None = None  # (time, step) when training started
    next_time_check: float = field(default=TIME_EVERY)


class ScheduleSync(pl.Callback):
    """Re-plans TVLARS schedules when the run differs from the plan (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._followed: dict[int, _Followed] = {}

    @classmethod
    def register(
        cls,
        trainer: pl.Trainer,
        scheduler: TVLARSScheduler,
        config: TVLARSConfig,
        batch_size: int | None,
    ) -> ScheduleSync:
        """Follow ``scheduler`` with the trainer's ``ScheduleSync`` (added if missing)."""
        sync = next((c for c in trainer.callbacks if isinstance(c, cls)), None)  # type: ignore[attr-defined]
        if sync is None:
            sync = cls()
            trainer.callbacks.append(sync)  # type: ignore[attr-defined]
        sync._followed[id(scheduler)] = _Followed(scheduler, config, batch_size)
        return sync

    def _live(self, trainer: pl.Trainer) -> list[_Followed]:
        live = {id(c.scheduler) for c in trainer.lr_scheduler_configs}
        self._followed = {k: v for k, v in self._followed.items() if k in live}
        return list(self._followed.values())

    def facts(self, trainer: pl.Trainer, followed: _Followed, **rate: Any) -> RunFacts:
        """The run as it is now for one schedule (its config's ``total_steps`` wins)."""
        optimizers = (
            1 if trainer.lightning_module.automatic_optimization else len(trainer.optimizers)
        )
        facts = run_facts(trainer, followed.batch_size, optimizers, **rate)
        if followed.config.total_steps is not None:
            return RunFacts(
                followed.config.total_steps,
                facts.per_device_batch_size,
                facts.replicas,
                facts.accumulation,
                facts.steps_per_epoch,
            )
        return facts

    def _replan(self, followed: _Followed, facts: RunFacts) -> None:
        scheduler = followed.scheduler
        scheduler.plan_for(facts.total_steps, facts.effective_batch_size)
        for change in scheduler.changes:
            rank_zero_info(f"TVLARS re-planned: {change}.")
        scheduler.changes.clear()

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        followed = self._live(trainer)
        _refuse_second_schedulers(trainer, [f.scheduler for f in followed])
        for f in followed:
            self._replan(f, self.facts(trainer, f))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for f in self._live(trainer):
            f.started = (time.monotonic(), f.scheduler.clock)
            f.next_time_check = TIME_EVERY

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for f in self._live(trainer):
            self._warn_if_the_epoch_length_changed(trainer, f)
            self._replan(f, self.facts(trainer, f, **self._rate(trainer, f)))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        for f in self._live(trainer):
            budget = time_budget(trainer)
            if budget is None or f.started is None or f.config.total_steps is not None:
                continue
            start, first = f.started
            steps = f.scheduler.clock - first
            used = time.monotonic() - start
            if steps < TIME_FIRST_STEPS or used < f.next_time_check * (used + budget):
                continue
            f.next_time_check = used / (used + budget) + TIME_EVERY
            facts = self.facts(trainer, f, **self._rate(trainer, f))
            planned = f.scheduler.plan.total_steps
            if planned is None or abs((facts.total_steps or planned) - planned) > 0.02 * planned:
                self._replan(f, facts)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for f in self._live(trainer):
            rank_zero_info(_summary(f.scheduler))

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _rate(trainer: pl.Trainer, followed: _Followed) -> dict[str, Any]:
        """The measured seconds per optimizer step, for a ``max_time`` limit."""
        if followed.started is None or time_budget(trainer) is None:
            return {}
        start, first = followed.started
        steps = followed.scheduler.clock - first
        if steps < TIME_FIRST_STEPS:
            return {}
        return {
            "seconds_per_step": (time.monotonic() - start) / steps,
            "step": followed.scheduler.clock,
        }

    @staticmethod
    def _warn_if_the_epoch_length_changed(trainer: pl.Trainer, followed: _Followed) -> None:
        length = float(trainer.num_training_batches)
        before, followed.epoch_length = followed.epoch_length, length
        if before is None or before == length or followed.warned_length:
            return
        followed.warned_length = True
        if followed.config.total_steps is None:
            rank_zero_warn(
                f"TVLARS: the training data changed length between epochs ({before:g} -> "
                f"{length:g} batches): the plan assumes every later epoch has the current "
                "length. If it keeps changing, state the run's length in optimizer steps: "
                "TVLARSConfig(total_steps=...) (--model.tvlars.total_steps)."
            )


def _refuse_second_schedulers(trainer: pl.Trainer, schedulers: list[TVLARSScheduler]) -> None:
    """Two owners of one optimizer's learning rate are refused before the first step."""
    for scheduler in schedulers:
        if scheduler.external:
            continue
        others = [
            type(c.scheduler).__name__
            for c in trainer.lr_scheduler_configs
            if c.scheduler is not scheduler and c.scheduler.optimizer is scheduler.optimizer
        ]
        if others:
            raise ValueError(
                f"{', '.join(others)} and TVLARSScheduler would both set the learning rate of "
                f"{type(scheduler.optimizer).__name__}: one owner. Hand it to your scheduler with "
                "TVLARSConfig(lr_schedule='external') (TVLARS keeps the phase; your scheduler "
                "starts from the batch-scaled rate), or drop yours and let TVLARS schedule it "
                "(warmup_fraction, lr_schedule='cosine' or 'polynomial')"
            )


def _summary(scheduler: TVLARSScheduler) -> str:
    """The end of a fit: the last step's phase and learning rate against the plan."""
    plan, last = scheduler.plan, scheduler.clock - 1
    if last < 0:
        return "TVLARS: no optimizer step was taken."
    parts = [f"TVLARS: last step {last}"]
    if plan.phase is not None:
        parts.append(f"phi {plan.phase(last):.4g}")
        if plan.total_steps is not None:
            parts.append(
                f"(planned: {plan.phase(plan.total_steps - 1):.4g} at step {plan.total_steps - 1})"
            )
    if not scheduler.external:
        parts.append(f"learning rate {scheduler.applied_lr(last):.6g}")
    if plan.total_steps is not None and last + 1 < plan.total_steps:
        parts.append(f"{plan.total_steps - last - 1} planned steps were not taken")
    return ", ".join(parts) + "."


def guard_lr_sweeps(scheduler: TVLARSScheduler, trainer: pl.Trainer) -> None:
    """Pause the schedule while Lightning's LR finder sweeps the learning rate: the finder
    replaces the trainer's callbacks and schedulers for the sweep and writes the rates itself;
    without the pause the phase would decay during it and the sweep's rates be refused."""

    def sweeping() -> bool:
        return any(type(c).__name__ == "_LRCallback" for c in trainer.callbacks)  # type: ignore[attr-defined]

    scheduler.pause_while(sweeping)
