"""``configure_tvlars``: TVLARS and its schedule in ``configure_optimizers``, in one call.

Each step is a small function: read the run (:class:`~lightning_tvlars.lightning.run.RunFacts`),
build the parameter groups and the optimizer, hand FSDP1 its shard groups, build the
:class:`~lightning_tvlars.TVLARSScheduler` (batch-scaled learning rate and phase), guard the phase
during LR sweeps, and make sure :class:`~lightning_tvlars.lightning.sync.ScheduleSync` keeps the
plan true while the run changes and that
:class:`~lightning_tvlars.lightning.teardown.EndProcessGroupAtExit` ends a distributed run cleanly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim import Optimizer

from lightning_tvlars.lightning._compat import lightning_classes
from lightning_tvlars.lightning.config import TVLARSConfig
from lightning_tvlars.lightning.run import RunFacts
from lightning_tvlars.lightning.scaling import scaled_lr
from lightning_tvlars.lightning.strategy import check_strategy
from lightning_tvlars.lightning.sync import ScheduleSync, describe_batch, guard_lr_sweeps
from lightning_tvlars.lightning.teardown import EndProcessGroupAtExit
from lightning_tvlars.optim import TVLARS, param_groups
from lightning_tvlars.phase import SigmoidPhase
from lightning_tvlars.schedule import FittedPhase, TVLARSScheduler

if TYPE_CHECKING:
    from lightning_tvlars.lightning._compat import AnyLightningModule

Parameters = nn.Module | Iterable[dict[str, Any]] | None


def attached_trainer(module: object) -> pl.Trainer:
    """The trainer of a LightningModule that is being fitted, or a clear error."""
    if not isinstance(module, lightning_classes("LightningModule")):
        raise TypeError(
            f"module={type(module).__name__} is invalid: expected the LightningModule whose "
            "configure_optimizers is running (choose the parameters with parameters=...)"
        )
    trainer = module._trainer  # type: ignore[attr-defined]
    if trainer is None:
        raise RuntimeError(
            f"{type(module).__name__} is not attached to a Trainer: call configure_tvlars from "
            "configure_optimizers, during trainer.fit"
        )
    return trainer


def build_groups(
    module: nn.Module, config: TVLARSConfig, parameters: Parameters = None
) -> list[dict[str, Any]]:
    """TVLARS's parameter groups for the module, a submodule or explicit groups (config rules)."""
    owner = parameters if isinstance(parameters, nn.Module) else module
    groups = None if isinstance(parameters, nn.Module) or parameters is None else list(parameters)
    return param_groups(
        owner,
        weight_decay=config.weight_decay,
        select=config.select,
        exclude=config.exclude,
        include=config.include,
        overrides=config.overrides,
        groups=groups,
    )


def build_optimizer(groups: list[dict[str, Any]], config: TVLARSConfig) -> TVLARS:
    """TVLARS at the base learning rate: the scheduler applies the batch scale and the phase."""
    return TVLARS(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        trust_coefficient=config.trust_coefficient,
        norm_clip=config.norm_clip,
    )


def attach_sharding(optimizer: Optimizer, trainer: pl.Trainer) -> None:
    """FSDP1 wraps the model before ``configure_optimizers``: register its shard groups."""
    wrapped = trainer.strategy.model
    fsdp = lightning_classes("strategies.FSDPStrategy")
    if isinstance(optimizer, TVLARS) and isinstance(trainer.strategy, fsdp) and wrapped:
        optimizer.attach_fsdp(wrapped)


def phase_for(config: TVLARSConfig, facts: RunFacts) -> FittedPhase | SigmoidPhase | None:
    """The phase the config asks for (an explicit delay in epochs converted to steps)."""
    phase = config.phase
    if phase.mode == "off":
        return None
    if phase.mode == "fitted":
        return FittedPhase(phase.half_at, phase.decayed_by_end, phase.alpha, phase.floor)
    assert phase.decay is not None and phase.delay is not None  # checked by PhaseConfig
    delay = facts.epochs_to_steps(phase.delay) if phase.delay_unit == "epochs" else phase.delay
    return SigmoidPhase(alpha=phase.alpha, decay=phase.decay, delay=delay, floor=phase.floor)


def batch_scale(config: Any, facts: RunFacts) -> float:
    """The learning-rate factor of the effective batch (``lr_scaling``, ``base_batch_size``)."""
    return scaled_lr(1.0, facts.effective_batch_size, config.base_batch_size, config.lr_scaling)


def build_scheduler(optimizer: Optimizer, config: TVLARSConfig, facts: RunFacts) -> TVLARSScheduler:
    """The schedule ``config`` asks for on the run ``facts`` describes: batch-scaled learning
    rate, annealing and phase."""
    return TVLARSScheduler(
        optimizer,
        total_steps=facts.total_steps,
        batch_scale=batch_scale(config, facts),
        effective_batch_size=facts.effective_batch_size,
        phase=phase_for(config, facts),
        lr_schedule=config.lr_schedule,
        final_lr_ratio=config.final_lr_ratio,
    )


def describe_plan(scheduler: TVLARSScheduler, config: TVLARSConfig, facts: RunFacts) -> str:
    """The one-line log of a new schedule: the effective batch, the learning rate, the plan."""
    lr = config.lr * scheduler.plan.batch_scale
    return describe_batch(facts, config.lr, lr, config) + f" Plan: {scheduler.describe()}."


def configure_tvlars(
    module: AnyLightningModule,
    config: TVLARSConfig | dict[str, Any] | None = None,
    *,
    parameters: Parameters = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Build TVLARS and its scheduler for ``module``; return them for Lightning.

    Call it from ``configure_optimizers`` (once per TVLARS optimizer).

    Args:
        module: the LightningModule being fitted (``lightning.pytorch`` or the standalone
            ``pytorch_lightning``).
        config: the options (defaults if ``None``).
        parameters: what this optimizer trains: ``None`` (every trainable parameter of
            ``module``), a submodule (e.g. ``self.generator``), or parameter groups of
            ``module``'s parameters (each split into adapted / excluded, its keys kept).
            ``config.select``, ``exclude``, ``include`` and ``overrides`` apply on top.
        batch_size: the per-device batch size; by default read from the training DataLoader.

    Returns:
        ``{"optimizer": TVLARS, "lr_scheduler": {"scheduler": TVLARSScheduler,
        "interval": "step"}}``.

    Raises:
        ValueError: a phase fitted to a run of unknown length (streaming data without
            ``max_steps``), an unsupported strategy (DeepSpeed ZeRO), bad options.
    """
    config = TVLARSConfig.from_any(config)
    trainer = attached_trainer(module)
    check_strategy(trainer)
    facts = RunFacts.from_trainer(trainer, batch_size)
    optimizer = build_optimizer(build_groups(module, config, parameters), config)
    attach_sharding(optimizer, trainer)
    scheduler = build_scheduler(optimizer, config, facts)
    ScheduleSync.register(trainer, scheduler, config, batch_size)
    EndProcessGroupAtExit.register(trainer)
    guard_lr_sweeps(optimizer, scheduler, trainer)
    rank_zero_info(describe_plan(scheduler, config, facts))
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }
