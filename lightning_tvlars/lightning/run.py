"""What Lightning knows about a run: its length in optimizer steps and its effective batch.

Lightning's own estimate (``trainer.estimated_stepping_batches``) assumes one accumulation
factor for the whole run, returns ``max_steps`` (-1 when unset) for streaming data, and counts
every optimizer's steps in ``max_steps``. The plan of a schedule needs the steps *this*
optimizer will really take, so it is computed here from the run's settings:

* per epoch, ``ceil(batches / accumulation(epoch))`` optimizer steps, with the accumulation of
  a ``GradientAccumulationScheduler`` where there is one;
* ``max_steps`` bounds the total; Lightning counts every optimizer's steps in it, so with
  several optimizers (manual optimization, e.g. a GAN) each one's share is
  ``max_steps / number of optimizers`` (each is assumed to step once per batch);
* streaming data without a length, or ``max_epochs=-1``, and no ``max_steps``: unknown (None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl

from lightning_tvlars.lightning._compat import lightning_classes
from lightning_tvlars.lightning.scaling import (
    data_parallel_size,
    per_device_batch_size,
)


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


@dataclass(frozen=True)
class RunFacts:
    """The run as Lightning describes it now (see the module docstring).

    Attributes:
        total_steps: optimizer steps of one optimizer over the whole run (None: unknown).
        steps_per_epoch: optimizer steps in each epoch ``0 .. max_epochs - 1`` (empty when the
            epochs have no length or the run has no epoch limit).
        per_device_batch_size, replicas, accumulation: the factors of the effective batch
            (accumulation of the current epoch).
    """

    total_steps: int | None
    steps_per_epoch: tuple[int, ...]
    per_device_batch_size: int
    replicas: int
    accumulation: int

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.replicas * self.accumulation

    def epochs_to_steps(self, epochs: float) -> float:
        """Optimizer steps in the first ``epochs`` epochs (fractions interpolate in the epoch)."""
        if epochs <= 0:
            return 0.0
        if not self.steps_per_epoch:
            raise ValueError(
                f"a delay of {epochs!r} epochs needs the number of steps per epoch, but the "
                "training epochs have no known length (streaming data or max_epochs=-1): give "
                "the delay in steps (phase.delay_unit='steps')"
            )
        whole = math.floor(epochs)
        per = self.steps_per_epoch
        done = sum(per[: min(whole, len(per))]) + max(0, whole - len(per)) * per[-1]
        part = epochs - whole
        return float(done + part * (per[min(whole, len(per) - 1)] if part else 0))

    @classmethod
    def from_trainer(
        cls, trainer: pl.Trainer, batch_size: int | None = None, optimizers: int = 1
    ) -> RunFacts:
        """Read the run from an attached trainer (loads the training data if needed).

        Args:
            batch_size: per-device batch size; read from the training DataLoader if omitted.
            optimizers: optimizers that step once per batch (they share ``max_steps``).
        """
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        per_device = per_device_batch_size(trainer) if batch_size is None else batch_size
        epoch = trainer.current_epoch
        batches = trainer.num_training_batches
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        per_epoch: tuple[int, ...] = ()
        if math.isfinite(batches):
            # without an epoch limit, the epochs up to the last change of accumulation (the
            # later ones repeat the last value)
            scheduler = _accumulation_scheduler(trainer)
            changes = max(scheduler.scheduling, default=0) if scheduler is not None else 0
            epochs = max_epochs if max_epochs != -1 else changes + 1
            per_epoch = tuple(
                max(1, math.ceil(batches / accumulation(trainer, e))) for e in range(epochs)
            )
        bounds = []
        if per_epoch and max_epochs != -1:
            bounds.append(sum(per_epoch))
        if trainer.max_steps != -1:
            bounds.append(max(1, trainer.max_steps // max(1, optimizers)))
        return cls(
            total_steps=min(bounds) if bounds else None,
            steps_per_epoch=per_epoch,
            per_device_batch_size=per_device,
            replicas=data_parallel_size(trainer),
            accumulation=accumulation(trainer, epoch),
        )
