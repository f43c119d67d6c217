"""``TVLARSConfig``: every optimizer, phase, scaling and schedule option in one dataclass.

A LightningModule that takes ``tvlars: TVLARSConfig`` in ``__init__`` gets all of these as
LightningCLI flags (``--model.tvlars.lr 2.0``) and YAML keys, and saves them with its
hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lightning_tvlars._validation import (
    check_choice,
    check_non_negative,
    check_open_interval,
    check_positive,
    check_positive_int,
    check_real,
    check_unit_interval,
)
from lightning_tvlars.lightning.scaling import SCALING_RULES, ScalingRule
from lightning_tvlars.lightning.schedule import ScheduleKind

OptimizerName = Literal["tvlars", "lars", "lightly-lars", "timm-lamb"]
OPTIMIZERS: tuple[str, ...] = ("tvlars", "lars", "lightly-lars", "timm-lamb")


@dataclass
class TVLARSConfig:
    """Options of :func:`~lightning_tvlars.configure_tvlars`.

    Optimizer:
        optimizer: ``tvlars`` (default); ``lars`` is TVLARS without phase (phi == 1);
            ``lightly-lars`` and ``timm-lamb`` are the baselines of the benchmark (lightly's
            ``LARS`` and timm's ``Lamb``), built on the same parameter groups.
        lr: base learning rate at ``base_batch_size``; scaled with the effective batch.
        scaling: ``linear``, ``sqrt`` or ``none``; ``base_batch_size``: the reference batch.
        momentum, weight_decay, trust_coefficient, norm_clip: as in
            :class:`~lightning_tvlars.TVLARS`.

    Phase (``tvlars`` only), ``phi(t) = 1 / (alpha + exp(decay (t - delay))) + floor``:
        decay: per optimizer step. ``None`` (default) fits the phase to the run: halfway at
            ``half_fraction`` of the training steps, ``decayed_fraction`` decayed at the end.
        delay / delay_epochs: the centre of the decay in steps, or in epochs (converted with
            the real number of optimizer steps per epoch). At most one of them.
        alpha, floor: the ceiling ``1/alpha + floor`` and the floor.

    Schedule (mostly for the baselines):
        warmup_epochs: linear warm-up length; 0 for TVLARS, 20 in the paper's baselines.
        schedule: ``constant`` or ``cosine`` (to ``final_lr_ratio`` x peak) after warm-up.
    """

    optimizer: OptimizerName = "tvlars"
    lr: float = 1.0
    scaling: ScalingRule = "linear"
    base_batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trust_coefficient: float = 1e-3
    norm_clip: float | None = None
    alpha: float = 1.0
    decay: float | None = None
    delay: float | None = None
    delay_epochs: float | None = None
    floor: float = 0.0
    half_fraction: float = 0.5
    decayed_fraction: float = 0.99
    warmup_epochs: float = 0.0
    schedule: ScheduleKind = "constant"
    final_lr_ratio: float = 1e-3

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_positive("lr", self.lr)
        check_choice("scaling", self.scaling, SCALING_RULES)
        check_positive_int("base_batch_size", self.base_batch_size)
        check_unit_interval("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_positive("trust_coefficient", self.trust_coefficient)
        if self.norm_clip is not None:
            check_positive("norm_clip", self.norm_clip)
        check_positive("alpha", self.alpha)
        if self.decay is not None:
            check_non_negative("decay", self.decay)
        if self.delay is not None:
            check_real("delay", self.delay)
        if self.delay_epochs is not None:
            check_real("delay_epochs", self.delay_epochs)
            if self.delay is not None:
                raise ValueError(
                    f"delay={self.delay!r} and delay_epochs={self.delay_epochs!r} are both set: "
                    "expected at most one of them"
                )
        if (self.delay is not None or self.delay_epochs is not None) and self.decay is None:
            raise ValueError(
                "delay/delay_epochs is set but decay=None: expected a decay with an explicit delay "
                "(decay=None fits both to the run)"
            )
        check_non_negative("floor", self.floor)
        check_unit_interval("half_fraction", self.half_fraction)
        check_open_interval("decayed_fraction", self.decayed_fraction, 0.5, 1.0)
        check_non_negative("warmup_epochs", self.warmup_epochs)
        check_choice("schedule", self.schedule, ("constant", "cosine"))
        check_non_negative("final_lr_ratio", self.final_lr_ratio)


# Lightning resumes with torch.load(weights_only=True) by default: allow the config in hparams.
torch.serialization.add_safe_globals([TVLARSConfig])
