"""What a Lightning Trainer knows about its run: the length in optimizer steps and the batch.

Lightning's own estimate (``trainer.estimated_stepping_batches``) assumes one accumulation
factor for the whole run, returns ``max_steps`` (-1 when unset) for streaming data, and counts
every optimizer's steps in ``max_steps``. A schedule needs the steps *this* optimizer will really
take, so they are read here from the run's settings:

* per epoch, ``ceil(batches / accumulation(epoch))`` optimizer steps, with the accumulation of a
  ``GradientAccumulationScheduler`` where there is one;
* ``max_steps`` bounds the total; Lightning counts every optimizer's steps in it, so with
  several optimizers (manual optimization, e.g. a GAN) each one's share is
  ``max_steps / number of optimizers``;
* ``max_time`` bounds it too, by the rate of the steps so far (:func:`time_budget`; the schedule
  is re-planned as it is measured);
* streaming data without a length, or no epoch limit, and nothing else: unknown (None).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_tvlars.lightning._compat import lightning_classes
from lightning_tvlars.recipe import RunFacts, data_parallel_size


def _accumulation_scheduler(trainer: pl.Trainer) -> Any:
    """The trainer's ``GradientAccumulationScheduler``, if it has one."""
    kinds = lightning_classes("callbacks.GradientAccumulationScheduler")
    return next((c for c in trainer.callbacks if isinstance(c, kinds)), None)  # type: ignore[attr-defined]


def accumulation(trainer: pl.Trainer, epoch: int) -> int:
    """Batches accumulated per optimizer step in ``epoch`` (a scheduler's value if any)."""
    scheduler = _accumulation_scheduler(trainer)
    if scheduler is not None:
        return int(scheduler.get_accumulate_grad_batches(epoch))
    return int(trainer.accumulate_grad_batches)


def per_device_batch_size(trainer: pl.Trainer) -> int:
    """The batch size of the training DataLoader (loads the training data if needed)."""
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        size = loader.batch_size
        if size is None and loader.batch_sampler is not None:
            size = getattr(loader.batch_sampler, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    raise ValueError(
        f"cannot read the per-device batch size from the training loader {type(loader).__name__}; "
        "pass batch_size=... explicitly"
    )


def time_budget(trainer: pl.Trainer) -> float | None:
    """The seconds of training the trainer's ``max_time`` leaves from now (None: no limit)."""
    timer = next(
        (c for c in trainer.callbacks if isinstance(c, lightning_classes("callbacks.Timer"))),  # type: ignore[attr-defined]
        None,
    )
    if timer is None or getattr(timer, "_duration", None) is None:
        return None
    return float(timer.time_remaining("train") or 0.0)  # type: ignore[attr-defined]


def epoch_lengths(trainer: pl.Trainer) -> tuple[int, ...]:
    """Optimizer steps of each epoch ``0 .. max_epochs - 1`` (without an epoch limit, those up
    to the last change of accumulation); empty when the epochs have no known length."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return ()
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    scheduler = _accumulation_scheduler(trainer)
    changes = max(scheduler.scheduling, default=0) if scheduler is not None else 0
    epochs = max_epochs if max_epochs != -1 else changes + 1
    return tuple(max(1, math.ceil(batches / accumulation(trainer, e))) for e in range(epochs))


def describe_seconds(seconds: float) -> str:
    """A duration for a log line: ``2.87 s`` below 100 s, ``1:23:20`` above."""
    if seconds < 100:
        return f"{seconds:.3g} s"
    return str(timedelta(seconds=round(seconds)))


def time_bound(trainer: pl.Trainer, seconds_per_step: float | None, step: int) -> int | None:
    """The optimizer steps the run reaches when ``max_time`` runs out, at ``seconds_per_step``
    from ``step`` on (None: no ``max_time``, or no rate measured yet)."""
    remaining = time_budget(trainer)
    if remaining is None or not seconds_per_step:
        return None
    return max(step + 1, step + math.floor(remaining / seconds_per_step))


def run_facts(
    trainer: pl.Trainer,
    batch_size: int | None = None,
    optimizers: int = 1,
    *,
    seconds_per_step: float | None = None,
    step: int = 0,
    epoch_start: tuple[int, int] | None = None,
) -> RunFacts:
    """Read the run from an attached trainer (loads the training data if needed).

    Args:
        batch_size: per-device batch size; read from the training DataLoader if omitted.
        optimizers: optimizers that step once per batch (they share ``max_steps``).
        seconds_per_step, step: the measured rate of this run's steps and the optimizer's step
            now, for a ``max_time`` limit (without a rate it bounds nothing yet).
        epoch_start: ``(epoch, steps taken before it)`` at the start of an epoch: the epochs
            done count with the steps they really took (data whose length changed), the rest
            with their planned length.
    """
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    per_device = per_device_batch_size(trainer) if batch_size is None else batch_size
    per_epoch = epoch_lengths(trainer)
    bounds = []
    if per_epoch and trainer.max_epochs not in (None, -1):
        epoch, done = epoch_start if epoch_start is not None else (0, 0)
        bounds.append(max(1, done + sum(per_epoch[epoch:])))
    if trainer.max_steps != -1:
        bounds.append(max(1, trainer.max_steps // max(1, optimizers)))
    by_time = time_bound(trainer, seconds_per_step, step)
    if by_time is not None:
        bounds.append(by_time)
    return RunFacts(
        total_steps=min(bounds) if bounds else None,
        per_device_batch_size=per_device,
        replicas=data_parallel_size(trainer.strategy),
        accumulation=accumulation(trainer, trainer.current_epoch),
        steps_per_epoch=per_epoch,
    )


def effective_batch_size(trainer: pl.Trainer, batch_size: int | None = None) -> int:
    """Per-device batch x data-parallel replicas x the current epoch's accumulation."""
    return run_facts(trainer, batch_size).effective_batch_size
