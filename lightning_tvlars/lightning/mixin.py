"""``configure_tvlars`` and ``TVLARSMixin``: TVLARS in a LightningModule with no code.

``configure_tvlars(module, config)`` builds, inside ``configure_optimizers``:

1. parameter groups with :func:`~lightning_tvlars.param_groups` (never ``model.parameters()``);
2. the learning rate scaled to the effective batch (per device x replicas x accumulation);
3. the phase, with epochs converted using the real number of optimizer steps per epoch
   (``limit_train_batches`` and accumulation included);
4. the optimizer (TVLARS, or a baseline for comparisons) and a per-step ``LambdaLR`` that
   carries warm-up, decay and the batch scale.

The resolved numbers are kept in ``module.tvlars_plan`` and logged once on rank zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_tvlars.lightning.config import TVLARSConfig
from lightning_tvlars.lightning.scaling import (
    data_parallel_size,
    describe,
    effective_batch_size,
    per_device_batch_size,
    scaled_lr,
)
from lightning_tvlars.lightning.schedule import LRMultiplier
from lightning_tvlars.lightning.strategy import check_strategy
from lightning_tvlars.optim import TVLARS, param_groups
from lightning_tvlars.phase import SigmoidPhase


@dataclass
class TVLARSPlan:
    """What ``configure_tvlars`` resolved for this run (``module.tvlars_plan``)."""

    config: TVLARSConfig
    per_device_batch_size: int
    effective_batch_size: int
    lr: float
    steps_per_epoch: int | None
    total_steps: int
    phase: SigmoidPhase | None
    multiplier: LRMultiplier


def _build_optimizer(
    config: TVLARSConfig, groups: list[dict[str, Any]], phase: SigmoidPhase | None
) -> Optimizer:
    name = config.optimizer
    if name in ("tvlars", "lars"):
        return TVLARS(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            trust_coefficient=config.trust_coefficient,
            phase=phase,
            norm_clip=config.norm_clip,
        )
    # The baselines take the same groups; they ignore the TVLARS-only keys.
    plain = [{k: v for k, v in g.items() if k not in ("adapt", "param_names")} for g in groups]
    if name == "lightly-lars":
        from lightly.utils.lars import LARS

        # lightly adapts exactly the groups with weight decay: the excluded group has none.
        return LARS(
            plain,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            trust_coefficient=config.trust_coefficient,
        )
    try:
        from timm.optim import Lamb
    except ImportError as err:  # pragma: no cover - timm is in the dev and bench extras
        raise ImportError(
            "optimizer='timm-lamb' needs timm: pip install 'lightning-tvlars[bench]'"
        ) from err
    # LAMB as in the paper: Adam moments (0.9, 0.999), eps 1e-6, no global gradient clipping.
    return Lamb(
        plain,
        lr=config.lr,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=config.weight_decay,
        max_grad_norm=None,
    )


def _epochs_to_steps(epochs: float, steps_per_epoch: int | None, argument: str) -> float:
    """Convert an epoch count to optimizer steps; 0 epochs needs no epoch length."""
    if epochs == 0:
        return 0.0
    if steps_per_epoch is None:
        raise ValueError(
            f"{argument}={epochs!r} needs the number of steps per epoch, but the training "
            "loader has no length: give the value in steps instead"
        )
    return epochs * steps_per_epoch


def _resolve_phase(
    config: TVLARSConfig, steps_per_epoch: int | None, total_steps: int
) -> SigmoidPhase | None:
    if config.optimizer != "tvlars":
        return None
    if config.decay is None:
        return SigmoidPhase.from_training_length(
            total_steps,
            half_fraction=config.half_fraction,
            decayed_fraction=config.decayed_fraction,
            alpha=config.alpha,
            floor=config.floor,
        )
    if config.delay_epochs is not None:
        delay = _epochs_to_steps(config.delay_epochs, steps_per_epoch, "delay_epochs")
    else:
        delay = config.delay or 0.0
    return SigmoidPhase(alpha=config.alpha, decay=config.decay, delay=delay, floor=config.floor)


def configure_tvlars(
    module: pl.LightningModule,
    config: TVLARSConfig | None = None,
    *,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Build the optimizer and per-step scheduler for ``module``; return them for Lightning.

    Call it from ``configure_optimizers``. ``batch_size`` is the per-device batch size; by
    default it is read from the training DataLoader.

    Returns:
        ``{"optimizer": ..., "lr_scheduler": {"scheduler": LambdaLR, "interval": "step"}}``.
    """
    config = config or TVLARSConfig()
    trainer = module.trainer
    check_strategy(trainer)
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    total_steps = trainer.estimated_stepping_batches
    if not math.isfinite(total_steps):
        raise ValueError(
            "the run length is unknown (max_epochs=-1 and no max_steps): set max_epochs or "
            "max_steps, or give the phase an explicit decay"
        )
    total_steps = max(1, int(total_steps))
    accumulation = int(trainer.accumulate_grad_batches)
    batches = trainer.num_training_batches
    steps_per_epoch = max(1, math.ceil(batches / accumulation)) if math.isfinite(batches) else None
    per_device = per_device_batch_size(trainer) if batch_size is None else batch_size
    batch = effective_batch_size(trainer, per_device)
    lr = scaled_lr(config.lr, batch, config.base_batch_size, config.scaling)

    phase = _resolve_phase(config, steps_per_epoch, total_steps)
    optimizer = _build_optimizer(
        config, param_groups(module, weight_decay=config.weight_decay), phase
    )
    wrapped = trainer.strategy.model
    if (
        isinstance(optimizer, TVLARS)
        and isinstance(trainer.strategy, FSDPStrategy)
        and wrapped is not None
    ):
        optimizer.attach_fsdp(wrapped)  # FSDP1: wrapped before this hook runs
    multiplier = LRMultiplier(
        scale=lr / config.lr,
        warmup_steps=round(
            _epochs_to_steps(config.warmup_epochs, steps_per_epoch, "warmup_epochs")
        ),
        total_steps=total_steps,
        kind=config.schedule,
        final_ratio=config.final_lr_ratio,
    )
    scheduler = LambdaLR(optimizer, multiplier)
    plan = TVLARSPlan(
        config, per_device, batch, lr, steps_per_epoch, total_steps, phase, multiplier
    )
    setattr(module, "tvlars_plan", plan)  # noqa: B010 - nn.Module's typing hides plain attributes
    rank_zero_info(
        describe(
            per_device,
            data_parallel_size(trainer),
            accumulation,
            config.lr,
            lr,
            config.base_batch_size,
            config.scaling,
        )
        + (f" Phase: {phase!r}." if phase is not None else "")
    )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {
            "scheduler": scheduler,
            "interval": "step",
            "frequency": 1,
            "name": config.optimizer,
        },
    }


class EffectiveBatchScaling(pl.Callback):
    """Re-scales the learning rate when the effective batch changes between epochs.

    ``GradientAccumulationScheduler`` changes ``accumulate_grad_batches`` at the start of an
    epoch; this callback runs after it and updates the scale in the scheduler's multiplier.
    ``TVLARSMixin`` adds it through ``configure_callbacks``.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan: TVLARSPlan | None = getattr(pl_module, "tvlars_plan", None)
        if plan is None:
            return
        batch = effective_batch_size(trainer, plan.per_device_batch_size)
        if batch == plan.effective_batch_size:
            return
        cfg = plan.config
        plan.effective_batch_size = batch
        plan.lr = scaled_lr(cfg.lr, batch, cfg.base_batch_size, cfg.scaling)
        plan.multiplier.scale = plan.lr / cfg.lr
        for scheduler_config in trainer.lr_scheduler_configs:
            scheduler = scheduler_config.scheduler
            if isinstance(scheduler, LambdaLR) and plan.multiplier in scheduler.lr_lambdas:
                for group, base, fn in zip(
                    scheduler.optimizer.param_groups,
                    scheduler.base_lrs,
                    scheduler.lr_lambdas,
                    strict=True,
                ):
                    group["lr"] = base * fn(scheduler.last_epoch)
        rank_zero_info(
            describe(
                plan.per_device_batch_size,
                data_parallel_size(trainer),
                int(trainer.accumulate_grad_batches),
                cfg.lr,
                plan.lr,
                cfg.base_batch_size,
                cfg.scaling,
            )
        )


class TVLARSMixin:
    """Give a LightningModule TVLARS with no code.

    Inherit it before ``LightningModule`` and take a ``tvlars`` argument::

        class Classifier(TVLARSMixin, L.LightningModule):
            def __init__(self, tvlars: TVLARSConfig | None = None):
                super().__init__()
                self.save_hyperparameters()

    ``configure_optimizers`` then calls :func:`configure_tvlars` with ``hparams["tvlars"]``
    (defaults if absent), and ``configure_callbacks`` adds :class:`EffectiveBatchScaling`.
    """

    tvlars_plan: TVLARSPlan | None = None

    @property
    def tvlars_config(self) -> TVLARSConfig:
        """The config from ``hparams["tvlars"]`` (a ``TVLARSConfig`` or a mapping)."""
        value = getattr(self, "hparams", {}).get("tvlars")
        if value is None:
            return TVLARSConfig()
        if isinstance(value, TVLARSConfig):
            return value
        if isinstance(value, Mapping):
            return TVLARSConfig(**value)
        raise TypeError(
            f"hparams['tvlars']={value!r} is invalid: expected a TVLARSConfig or a dict"
        )

    def configure_optimizers(self) -> Any:
        assert isinstance(self, pl.LightningModule), (
            "TVLARSMixin must be mixed into a LightningModule"
        )
        return configure_tvlars(self, self.tvlars_config)

    def configure_callbacks(self) -> Any:
        callbacks = list(super().configure_callbacks())  # type: ignore[misc]
        return [*callbacks, EffectiveBatchScaling()]
