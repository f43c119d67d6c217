"""Effective (global) batch size under any Lightning strategy, and learning-rate scaling rules.

The effective batch is what one optimizer step averages over::

    effective batch = per-device batch x data-parallel replicas x accumulated batches

The replica count is ``trainer.strategy.distributed_sampler_kwargs["num_replicas"]``: the
data-parallel degree, which differs from ``trainer.world_size`` under tensor parallelism
(``ModelParallelStrategy``).
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_tvlars._validation import check_choice, check_positive, check_positive_int

ScalingRule = Literal["linear", "sqrt", "none"]
SCALING_RULES: tuple[str, ...] = ("linear", "sqrt", "none")


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int, rule: ScalingRule) -> float:
    """``base_lr`` scaled from ``base_batch_size`` to ``batch_size``.

    ``linear``: ``base_lr * B / B0`` (Goyal et al. 2017); ``sqrt``: ``base_lr * sqrt(B / B0)``
    (Krizhevsky 2014, common for LAMB/Adam); ``none``: ``base_lr``.

    >>> scaled_lr(0.5, 4096, 256, "linear"), scaled_lr(0.5, 4096, 256, "sqrt")
    (8.0, 2.0)
    """
    check_positive("base_lr", base_lr)
    ratio = check_positive_int("batch_size", batch_size) / check_positive_int(
        "base_batch_size", base_batch_size
    )
    rule = check_choice("lr_scaling", rule, SCALING_RULES)  # type: ignore[assignment]
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def data_parallel_size(trainer: pl.Trainer) -> int:
    """How many replicas see different data (1 without a distributed strategy)."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", 1))


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


def effective_batch_size(trainer: pl.Trainer, batch_size: int | None = None) -> int:
    """Per-device batch x data-parallel replicas x ``accumulate_grad_batches``.

    Args:
        trainer: an attached trainer (inside ``configure_optimizers`` or a callback hook).
        batch_size: the per-device batch size; read from the training DataLoader if omitted.

    Raises:
        ValueError: the result is not a positive integer.
    """
    per_device = per_device_batch_size(trainer) if batch_size is None else batch_size
    check_positive_int("batch_size", per_device)
    total = per_device * data_parallel_size(trainer) * int(trainer.accumulate_grad_batches)
    if total <= 0:
        raise ValueError(f"effective batch size {total} is invalid: expected a positive size")
    return total
