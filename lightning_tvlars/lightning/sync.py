"""``ScheduleSync``: keeps every :class:`~lightning_tvlars.TVLARSScheduler` true to the real run.

The plan made in ``configure_optimizers`` is an estimate. This callback re-reads the run
(:func:`~lightning_tvlars.lightning.run.run_facts`) and hands it to
:meth:`~lightning_tvlars.TVLARSScheduler.plan_for`, which re-plans without a jump:

* at fit start, after a checkpoint is restored and with the number of optimizers known (a
  resume into a longer run, onto more devices, with another batch);
* at every epoch start (accumulation schedules, data loaders reloaded with another length:
  the epochs done count with the steps they took, the later ones with the current length; a
  change of the epoch's length is warned about once, naming ``total_steps``);
* with ``Trainer(max_time=...)``, from the measured rate of the steps, so that the phase and
  the annealing reach their end when the time runs out (the rate is measured after the first
  steps, which carry the start-up, and re-checked every 5% of the budget);

and logs every change in one line, the changes made when a checkpoint was loaded included (at
the start of the resumed training, once); a change made for the time budget says so. It
refuses, before the first step, a second learning-rate scheduler on an optimizer whose rate a
TVLARSScheduler owns, and ends the fit with one line per schedule: the last phase and
learning rate against the plan. It holds no state of its own: the plan lives in the scheduler,
which Lightning saves and restores. :func:`~lightning_tvlars.configure_tvlars` adds it to the
trainer if it is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_tvlars.lightning.run import describe_seconds, run_facts, time_bound, time_budget
from lightning_tvlars.recipe import RunFacts, TVLARSConfig
from lightning_tvlars.schedule import TVLARSScheduler

#: The step rate of a time budget is measured from the end of the first ``TIME_SETTLE_STEPS``
#: (they carry the start-up: loaders, allocations, compilation) over ``TIME_FIRST_STEPS`` steps
#: (or two, if they take ``TIME_EVERY`` of the budget); then it is re-checked every
#: ``TIME_EVERY`` of the budget and the plan moved when it is off by more than
#: ``TIME_TOLERANCE`` (relative). The rate is the slower of the average since the start-up
#: and the one over the last ``TIME_WINDOW`` of the budget (steps that slow down: stopping
#: short of the plan would leave phi and the learning rate high; running past it takes them
#: on towards their end values).
TIME_SETTLE_STEPS, TIME_FIRST_STEPS, TIME_EVERY, TIME_TOLERANCE = 3, 10, 0.05, 0.02
TIME_WINDOW = 0.2


@dataclass
class _Followed:
    """A schedule this callback keeps true, and what it needs to read the run for it."""

    scheduler: TVLARSScheduler
    config: TVLARSConfig
    batch_size: int | None
    epoch_length: float | None = None
    warned_length: bool = False
    started: tuple[float, int] | None = None  # (time, step) when training started
    rate_from: tuple[float, int] | None = None  # (time, step) the step rate is measured from
    next_time_check: float = TIME_EVERY
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, step) at checks


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
            return replace(facts, total_steps=followed.config.total_steps)
        return facts

    @staticmethod
    def _log_changes(scheduler: TVLARSScheduler, reason: str | None = None) -> None:
        """Log (once) and clear what the scheduler re-planned; ``reason`` follows the length."""
        name = type(scheduler.optimizer).__name__  # TVLARS or LAMB
        for change in scheduler.changes:
            why = f" ({reason})" if reason and change.startswith("run length") else ""
            rank_zero_info(f"{name} re-planned: {change}{why}.")
        scheduler.changes.clear()

    def _replan(self, followed: _Followed, facts: RunFacts, reason: str | None = None) -> None:
        followed.scheduler.plan_for(facts.total_steps, facts.effective_batch_size)
        self._log_changes(followed.scheduler, reason)

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_second_schedulers(trainer, self._on_trainer_optimizers(trainer))
        for f in self._live(trainer):
            self._replan(f, self.facts(trainer, f))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.monotonic()
        for f in self._live(trainer):
            self._log_changes(f.scheduler)  # made when a checkpoint was restored
            f.started, f.rate_from, f.samples = (now, f.scheduler.clock), None, []
            f.next_time_check = TIME_EVERY

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for f in self._live(trainer):
            self._warn_if_the_epoch_length_changed(trainer, f)
            start = (trainer.current_epoch, f.scheduler.clock)
            self._replan(f, *self._time_facts(trainer, f, epoch_start=start))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if time_budget(trainer) is None or trainer.should_stop:  # no limit, or it ran out
            return
        for f in self._live(trainer):
            if f.config.total_steps is None and self._time_check_due(trainer, f):
                facts, reason = self._time_facts(trainer, f)
                if reason is not None:
                    self._replan(f, facts, reason)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for f in self._live(trainer):
            rank_zero_info(_summary(f.scheduler))

    def _on_trainer_optimizers(self, trainer: pl.Trainer) -> list[TVLARSScheduler]:
        """The followed schedulers of this trainer's optimizers, returned or not."""
        return [
            f.scheduler
            for f in self._followed.values()
            if any(f.scheduler.optimizer is o for o in trainer.optimizers)
        ]

    # ------------------------------------------------------------------ the time budget

    @staticmethod
    def _time_check_due(trainer: pl.Trainer, followed: _Followed) -> bool:
        """Start measuring the step rate after the first steps, then say when to re-check it
        (every ``TIME_EVERY`` of the time budget)."""
        if followed.started is None:
            return False
        now, clock = time.monotonic(), followed.scheduler.clock
        if followed.rate_from is None:
            if clock - followed.started[1] >= TIME_SETTLE_STEPS:
                followed.rate_from = (now, clock)
                followed.samples = [(now, clock)]
            return False
        used, left = now - followed.started[0], time_budget(trainer) or 0.0
        if not _rate_measured(followed, now, used + left):
            return False
        if used < followed.next_time_check * (used + left):
            return False
        followed.next_time_check = used / (used + left) + TIME_EVERY
        keep = int(TIME_WINDOW / TIME_EVERY) + 2  # checks are TIME_EVERY apart or more
        followed.samples = [*followed.samples[-keep:], (now, clock)]
        return True

    def _time_facts(
        self, trainer: pl.Trainer, followed: _Followed, **epoch: Any
    ) -> tuple[RunFacts, str | None]:
        """The run's facts with the measured step rate, and why the length changes if the
        time budget changes it (None: it does not, or by less than ``TIME_TOLERANCE``)."""
        rate = self._rate(trainer, followed)
        facts = self.facts(trainer, followed, **rate, **epoch)
        by_time = time_bound(trainer, rate.get("seconds_per_step"), rate.get("step", 0))
        planned = followed.scheduler.plan.total_steps
        stated = followed.config.total_steps is not None
        if by_time is None or facts.total_steps != by_time or stated:
            return facts, None
        if planned is not None and abs(by_time - planned) <= TIME_TOLERANCE * planned:
            return replace(facts, total_steps=planned), None
        left = describe_seconds(max(0.0, time_budget(trainer) or 0.0))
        per_step = describe_seconds(rate["seconds_per_step"])
        return facts, f"time budget: max_time leaves {left} at {per_step} per step"

    @staticmethod
    def _rate(trainer: pl.Trainer, followed: _Followed) -> dict[str, Any]:
        """The measured seconds per optimizer step, for a ``max_time`` limit."""
        budget = time_budget(trainer)
        if followed.rate_from is None or followed.started is None or budget is None:
            return {}
        now = time.monotonic()
        if not _rate_measured(followed, now, now - followed.started[0] + budget):
            return {}
        clock = followed.scheduler.clock
        start, first = followed.rate_from
        average = (now - start) / (clock - first)
        since = now - TIME_WINDOW * (now - followed.started[0] + budget)
        recent = [(t, c) for t, c in followed.samples if t <= since and clock - c >= 2]
        lately = (now - recent[-1][0]) / (clock - recent[-1][1]) if recent else 0.0
        return {"seconds_per_step": max(average, lately), "step": clock}

    # ------------------------------------------------------------------ data length

    @staticmethod
    def _warn_if_the_epoch_length_changed(trainer: pl.Trainer, followed: _Followed) -> None:
        length = float(trainer.num_training_batches)
        before, followed.epoch_length = followed.epoch_length, length
        if before is None or before == length or followed.warned_length:
            return
        followed.warned_length = True
        if followed.config.total_steps is None:
            rank_zero_warn(
                f"{type(followed.scheduler.optimizer).__name__}: the training data changed "
                f"length between epochs ({before:g} -> "
                f"{length:g} batches): the plan assumes every later epoch has the current "
                "length. If it keeps changing, state the run's length in optimizer steps: "
                "TVLARSConfig(total_steps=...) (--model.tvlars.total_steps)."
            )


def _rate_measured(followed: _Followed, now: float, budget: float) -> bool:
    """Whether enough steps were timed: ``TIME_FIRST_STEPS``, or two over ``TIME_EVERY`` of
    the budget (slow steps)."""
    if followed.rate_from is None:
        return False
    start, first = followed.rate_from
    steps = followed.scheduler.clock - first
    return steps >= TIME_FIRST_STEPS or (steps >= 2 and now - start >= TIME_EVERY * budget)


def _refuse_second_schedulers(trainer: pl.Trainer, schedulers: list[TVLARSScheduler]) -> None:
    """Two owners of one optimizer's learning rate are refused before the first step, whether
    or not ``configure_optimizers`` returned the TVLARSScheduler (it writes the rate before
    every step all the same)."""
    for scheduler in schedulers:
        if scheduler.external:
            continue
        others = [
            type(c.scheduler).__name__
            for c in trainer.lr_scheduler_configs
            if c.scheduler is not scheduler and c.scheduler.optimizer is scheduler.optimizer
        ]
        if not others:
            continue
        returned = any(c.scheduler is scheduler for c in trainer.lr_scheduler_configs)
        note = (
            ""
            if returned
            else " (configure_tvlars's TVLARSScheduler writes the rate before every step, "
            "returned by configure_optimizers or not)"
        )
        raise ValueError(
            f"{', '.join(others)} and TVLARSScheduler would both set the learning rate of "
            f"{type(scheduler.optimizer).__name__}{note}: one owner. Hand it to your scheduler "
            "with TVLARSConfig(lr_schedule='external') (TVLARS keeps the phase; your scheduler "
            "starts from the batch-scaled rate), or drop yours and let TVLARS schedule it "
            "(warmup_fraction, lr_schedule='cosine' or 'polynomial')"
        )


def _summary(scheduler: TVLARSScheduler) -> str:
    """The end of a fit: the last step's phase and learning rate against the plan."""
    plan, last = scheduler.plan, scheduler.clock - 1
    name = type(scheduler.optimizer).__name__  # TVLARS or LAMB
    if last < 0:
        return f"{name}: no optimizer step was taken."
    parts = [f"{name}: the fit ended after step {last}"]
    if plan.phase is not None:
        phi = f"phi {plan.phase(last):.4g}"
        if plan.total_steps is not None:
            end = plan.total_steps - 1
            phi += f" (planned: {plan.phase(end):.4g} at the plan's last step, {end})"
        parts.append(phi)
    if not scheduler.external:
        parts.append(f"learning rate {scheduler.applied_lr(last):.6g}")
    if plan.total_steps is not None and last + 1 != plan.total_steps:
        missing = plan.total_steps - last - 1
        parts.append(
            f"{missing} planned steps were not taken"
            if missing > 0
            else f"{-missing} steps beyond the plan"
        )
    return ", ".join(parts) + "."


def guard_lr_sweeps(scheduler: TVLARSScheduler, trainer: pl.Trainer) -> None:
    """Pause the schedule while Lightning's LR finder sweeps the learning rate: the finder
    replaces the trainer's callbacks and schedulers for the sweep and writes the rates itself;
    without the pause the phase would decay during it and the sweep's rates be refused."""

    def sweeping() -> bool:
        return any(type(c).__name__ == "_LRCallback" for c in trainer.callbacks)  # type: ignore[attr-defined]

    scheduler.pause_while(sweeping)
