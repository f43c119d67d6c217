"""The benchmark's baselines: LARS and LAMB with a linear warm-up, as in the TVLARS paper.

Kept out of :class:`~lightning_tvlars.TVLARSConfig` on purpose: TVLARS needs no warm-up, and the
baselines are something to compare against, not a TVLARS option. They share everything else with
TVLARS runs: the parameter groups (biases and normalization parameters neither adapted nor
decayed), the effective-batch scaling and :class:`~lightning_tvlars.TVLARSScheduler` (run
length, resume and accumulation handled the same way).

* ``lars``: TVLARS with the phase off (``phi == 1``), i.e. LARS in the Barlow Twins form;
* ``lightly-lars``: lightly's ``LARS`` (trust ratio ``||w|| / (||g|| + wd ||w||)``);
* ``timm-lamb``: timm's ``Lamb`` (Adam moments (0.9, 0.999), eps 1e-6, no global clipping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim import Optimizer

from lightning_tvlars._validation import (
    check_choice,
    check_non_negative,
    check_positive,
    check_unit_interval,
)
from lightning_tvlars.lightning.config import TVLARSConfig
from lightning_tvlars.lightning.configure import attached_trainer, batch_scale, build_groups
from lightning_tvlars.lightning.run import RunFacts
from lightning_tvlars.lightning.scaling import SCALING_RULES, ScalingRule
from lightning_tvlars.lightning.strategy import check_strategy
from lightning_tvlars.lightning.sync import ScheduleSync
from lightning_tvlars.optim import TVLARS
from lightning_tvlars.schedule import LR_SCHEDULES, LRSchedule, TVLARSScheduler

Baseline = Literal["lars", "lightly-lars", "timm-lamb"]
BASELINES: tuple[str, ...] = ("lars", "lightly-lars", "timm-lamb")


@dataclass
class BaselineConfig:
    """A warm-up baseline (see the module docstring).

    Attributes:
        optimizer: ``lars``, ``lightly-lars`` or ``timm-lamb``.
        lr, lr_scaling, base_batch_size, momentum, weight_decay, trust_coefficient: as in
            :class:`~lightning_tvlars.TVLARSConfig` (momentum and trust coefficient are not
            used by LAMB).
        warmup_fraction: linear warm-up over this fraction of the run (the paper: 20 of 100
            epochs).
        lr_schedule: after the warm-up, ``constant`` or ``cosine`` to ``final_lr_ratio``.
    """

    optimizer: Baseline = "lars"
    lr: float = 1.0
    lr_scaling: ScalingRule = "linear"
    base_batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trust_coefficient: float = 1e-3
    warmup_fraction: float = 0.2
    lr_schedule: LRSchedule = "cosine"
    final_lr_ratio: float = 1e-3

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, BASELINES)
        check_positive("lr", self.lr)
        check_choice("lr_scaling", self.lr_scaling, SCALING_RULES)
        check_unit_interval("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_positive("trust_coefficient", self.trust_coefficient)
        check_unit_interval("warmup_fraction", self.warmup_fraction)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_non_negative("final_lr_ratio", self.final_lr_ratio)


def build_baseline(groups: list[dict[str, Any]], config: BaselineConfig) -> Optimizer:
    """The baseline optimizer on TVLARS's parameter groups."""
    if config.optimizer == "lars":
        return TVLARS(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            trust_coefficient=config.trust_coefficient,
        )
    # The other libraries take the same groups without TVLARS's own keys.
    plain = [{k: v for k, v in g.items() if k not in ("adapt", "param_names")} for g in groups]
    if config.optimizer == "lightly-lars":
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
        raise ImportError("optimizer='timm-lamb' needs timm: pip install timm") from err
    return Lamb(
        plain,
        lr=config.lr,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=config.weight_decay,
        max_grad_norm=None,
    )


def baseline_schedule(
    module: nn.Module, config: BaselineConfig, facts: RunFacts
) -> tuple[Optimizer, TVLARSScheduler]:
    """The baseline optimizer on ``module``'s TVLARS parameter groups and its schedule (linear
    warm-up over ``warmup_fraction`` of ``facts.total_steps``, then ``lr_schedule``)."""
    groups = build_groups(module, TVLARSConfig(weight_decay=config.weight_decay))
    optimizer = build_baseline(groups, config)
    total = facts.total_steps
    scheduler = TVLARSScheduler(
        optimizer,
        total_steps=total,
        batch_scale=batch_scale(config, facts),
        effective_batch_size=facts.effective_batch_size,
        lr_schedule=config.lr_schedule,
        final_lr_ratio=config.final_lr_ratio,
        warmup_steps=round(config.warmup_fraction * total) if total else 0,
    )
    return optimizer, scheduler


def configure_baseline(
    module: pl.LightningModule, config: BaselineConfig, *, batch_size: int | None = None
) -> dict[str, Any]:
    """Like :func:`~lightning_tvlars.configure_tvlars`, for a warm-up baseline."""
    trainer = attached_trainer(module)
    check_strategy(trainer)
    optimizer, scheduler = baseline_schedule(
        module, config, RunFacts.from_trainer(trainer, batch_size)
    )
    ScheduleSync.register(trainer, scheduler, config, batch_size)
    rank_zero_info(
        f"Baseline {config.optimizer}: {scheduler.describe()}, warm-up "
        f"{scheduler.warmup_steps} steps."
    )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }
