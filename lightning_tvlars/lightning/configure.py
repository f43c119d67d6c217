"""``configure_tvlars``: the recipe's optimizer and schedule in ``configure_optimizers``.

An adapter: it reads the run from the trainer (:func:`~lightning_tvlars.lightning.run.run_facts`),
builds with :func:`~lightning_tvlars.recipe.build`, hands FSDP1 its shard groups, pauses the
schedule during LR sweeps, and has :class:`~lightning_tvlars.lightning.sync.ScheduleSync` keep the
plan true while the run changes and
:class:`~lightning_tvlars.lightning.teardown.EndProcessGroupAtExit` end a distributed run cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_tvlars.lightning._compat import lightning_classes
from lightning_tvlars.lightning.run import describe_seconds, run_facts, time_budget
from lightning_tvlars.lightning.sync import ScheduleSync, guard_lr_sweeps
from lightning_tvlars.lightning.teardown import EndProcessGroupAtExit
from lightning_tvlars.recipe import (
    Parameters,
    RunFacts,
    TVLARSConfig,
    build,
    check_strategy,
    describe_plan,
)

if TYPE_CHECKING:
    from lightning_tvlars.lightning._compat import AnyLightningModule


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


def configure_tvlars(
    module: AnyLightningModule,
    config: TVLARSConfig | dict[str, Any] | None = None,
    *,
    parameters: Parameters | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Build the optimizer ``config`` asks for (TVLARS or LAMB) and its schedule, for Lightning.

    Call it from ``configure_optimizers`` (once per optimizer of the family).

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
        ``{"optimizer": ..., "lr_scheduler": {"scheduler": TVLARSScheduler, "interval":
        "step"}}``.

    Raises:
        ValueError: a schedule that needs the run length where the trainer cannot know it
            (streaming data without ``max_steps``, ``max_time`` alone), an unsupported
            strategy (DeepSpeed ZeRO), bad options.
    """
    config = TVLARSConfig.from_any(config)
    trainer = attached_trainer(module)
    check_strategy(trainer.strategy)
    facts = run_facts(trainer, batch_size)
    _refuse_an_unknown_time_budget(trainer, config, facts)
    optimizer, scheduler = build(module, config, facts, parameters=parameters)
    fsdp = lightning_classes("strategies.FSDPStrategy")
    if isinstance(trainer.strategy, fsdp) and trainer.strategy.model is not None:
        optimizer.attach_fsdp(trainer.strategy.model)  # FSDP1 wraps before configure_optimizers
    ScheduleSync.register(trainer, scheduler, config, batch_size)
    EndProcessGroupAtExit.register(trainer)
    guard_lr_sweeps(scheduler, trainer)
    plan = describe_plan(scheduler, facts) + _time_budget_note(trainer, config)
    if getattr(module, "_tvlars_fitted_before", False):
        plan += " A new fit: the schedule starts again at step 0 (to continue a run: ckpt_path)."
    module.__dict__["_tvlars_fitted_before"] = True
    rank_zero_info(plan)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


def _time_budget_note(trainer: pl.Trainer, config: TVLARSConfig) -> str:
    """What a ``max_time`` limit does to the plan (nothing when ``total_steps`` is stated)."""
    budget = time_budget(trainer)
    if budget is None or config.total_steps is not None:
        return ""
    return (
        f" Time budget: Trainer(max_time={describe_seconds(budget)}); the run length is "
        "re-planned from the measured step rate, so that the schedule ends when the time runs "
        "out."
    )


def _refuse_an_unknown_time_budget(
    trainer: pl.Trainer, config: TVLARSConfig, facts: RunFacts
) -> None:
    needs_length = (
        config.phase.mode == "fitted"
        or config.warmup_fraction > 0
        or config.lr_schedule in ("cosine", "polynomial")
    )
    unknown = facts.total_steps is None and config.total_steps is None
    if unknown and needs_length and time_budget(trainer) is not None:
        raise ValueError(
            "Trainer(max_time=...) alone does not say how many optimizer steps the run "
            "takes, and this schedule needs it before the first step (a fitted phase, a "
            "warm-up or annealing): add max_epochs or max_steps (the schedule then follows "
            "whichever ends first, re-planned from the measured step rate), state the length "
            "(TVLARSConfig(total_steps=...)), or use an explicit phase "
            "(PhaseConfig(mode='explicit', decay=..., delay=...)) with a constant learning rate"
        )
