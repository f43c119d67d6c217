r"""``TVLARSScheduler``: one object owns the schedule of a run, and adapts it when the run changes.

For optimizer step :math:`t` (the optimizer's own clock, :attr:`TVLARS.step_count`) the
scheduler sets, for every parameter group :math:`g`,

.. math::

    \eta_g(t) = \eta_{base} \cdot \text{lr\_scale}_g \cdot k_B \cdot w(t) \cdot a(t)

where :math:`k_B` is the effective-batch scale, :math:`w` a linear warm-up (baselines only,
1 for TVLARS), :math:`a` the annealing (1, or a cosine to ``final_lr_ratio``), and
``lr_scale`` the per-group multiplier (the group key timm uses). It also owns the phase
:math:`\phi(t)` that the optimizer applies: fitted to the run (halfway at ``half_at`` of it,
``decayed_by_end`` at its end), explicit (a fixed :class:`~lightning_tvlars.SigmoidPhase`), or
off.

The run a schedule is planned for can change: a resume into a longer run, another batch size
or device count, an accumulation schedule. :meth:`TVLARSScheduler.plan_for` (called with what
the run looks like now) re-plans without a jump: a fitted phase and a cosine continue from
their current value to the new end, the batch scale follows the new effective batch, and every
change is reported in :attr:`TVLARSScheduler.changes`. Its ``state_dict`` holds only numbers
and strings, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_tvlars._validation import (
    check_choice,
    check_non_negative,
    check_open_interval,
    check_positive,
    check_unit_interval,
)
from lightning_tvlars.phase import ConstantPhase, SigmoidPhase

LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


@dataclass(frozen=True)
class FittedPhase:
    """A phase fitted to the run length: halfway at ``half_at`` of it, ``decayed_by_end`` at the
    end (see :meth:`SigmoidPhase.from_training_length`)."""

    half_at: float = 0.5
    decayed_by_end: float = 0.99
    alpha: float = 1.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        check_unit_interval("half_at", self.half_at)
        check_open_interval("decayed_by_end", self.decayed_by_end, 0.5, 1.0)
        check_positive("alpha", self.alpha)
        check_non_negative("floor", self.floor)

    def fit(self, total_steps: int) -> SigmoidPhase:
        return SigmoidPhase.from_training_length(
            total_steps,
            half_at=self.half_at,
            decayed_by_end=self.decayed_by_end,
            alpha=self.alpha,
            floor=self.floor,
        )


@dataclass(frozen=True)
class Plan:
    """What the schedule currently follows (a snapshot; see :attr:`TVLARSScheduler.plan`).

    Attributes:
        total_steps: planned optimizer steps of this optimizer (``None``: unknown length).
        batch_scale: the effective-batch factor ``k_B`` of the learning rate.
        effective_batch_size: the batch it was computed for (``None`` if not given).
        phase: the phase in effect (``None``: phi == 1, plain LARS).
        anneal_start, anneal_value: the annealing runs from ``anneal_value`` at step
            ``anneal_start`` to ``final_lr_ratio`` at ``total_steps``.
    """

    total_steps: int | None
    batch_scale: float
    effective_batch_size: int | None
    phase: SigmoidPhase | None
    anneal_start: int
    anneal_value: float


class TVLARSScheduler(LRScheduler):
    """Learning rate and phase of one optimizer, as functions of its step count.

    Args:
        optimizer: a :class:`~lightning_tvlars.TVLARS` (its ``phase`` is set from here), or any
            optimizer for a learning-rate-only schedule (the benchmark's baselines).
        total_steps: the optimizer steps this run will take; needed by a fitted phase and by
            annealing. ``None`` when unknown.
        batch_scale: ``k_B``, e.g. ``effective_batch / 256`` for linear scaling.
        effective_batch_size: the effective batch ``batch_scale`` was computed for (reported).
        phase: :class:`FittedPhase`, a :class:`~lightning_tvlars.SigmoidPhase` (explicit, in
            steps) or ``None`` (phi == 1).
        lr_schedule: ``constant`` or ``cosine`` (to ``final_lr_ratio`` x peak at the end).
        final_lr_ratio: the end of the cosine, as a fraction of the peak.
        warmup_steps: linear warm-up from ``1 / (warmup_steps + 1)`` to 1 (baselines; TVLARS
            needs none).

    Raises:
        ValueError: a fitted phase or a cosine without a run length, or bad values.

    Examples:
        >>> import torch
        >>> from lightning_tvlars import TVLARS
        >>> opt = TVLARS([torch.nn.Parameter(torch.ones(3))], lr=0.5)
        >>> sched = TVLARSScheduler(opt, total_steps=100, batch_scale=4.0, phase=FittedPhase())
        >>> opt.param_groups[0]["lr"], round(opt.phase(50), 3), round(opt.phase(100), 3)
        (2.0, 0.5, 0.01)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_steps: int | None,
        batch_scale: float = 1.0,
        effective_batch_size: int | None = None,
        phase: FittedPhase | SigmoidPhase | None = None,
        lr_schedule: LRSchedule = "constant",
        final_lr_ratio: float = 1e-3,
        warmup_steps: int = 0,
    ) -> None:
        if phase is not None and not isinstance(phase, FittedPhase | SigmoidPhase):
            raise TypeError(
                f"phase={phase!r} is invalid: expected a FittedPhase, a SigmoidPhase or None"
            )
        self.lr_schedule = check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        self.final_lr_ratio = check_non_negative("final_lr_ratio", final_lr_ratio)
        self.warmup_steps = int(check_non_negative("warmup_steps", warmup_steps))
        self.fitted = phase if isinstance(phase, FittedPhase) else None
        self._check_length(total_steps, phase)
        self.plan = Plan(
            total_steps=total_steps,
            batch_scale=check_positive("batch_scale", batch_scale),
            effective_batch_size=effective_batch_size,
            phase=self.fitted.fit(total_steps) if self.fitted and total_steps else phase,  # type: ignore[arg-type]
            anneal_start=self.warmup_steps,
            anneal_value=1.0,
        )
        #: What the run looks like now (kept on load_state_dict, unlike ``plan``).
        self._target: tuple[int | None, float, int | None] = (
            total_steps,
            batch_scale,
            effective_batch_size,
        )
        #: Human-readable notes of what was re-planned, for the caller to log and clear.
        self.changes: list[str] = []
        self._held: ConstantPhase | None = None
        super().__init__(optimizer)
        self._install_phase()

    def _check_length(self, total_steps: int | None, phase: object) -> None:
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"total_steps={total_steps!r} is invalid: expected an int > 0 or None")
        if total_steps is None and isinstance(phase, FittedPhase):
            raise ValueError(
                "a phase fitted to the run needs the run length, which is unknown here (streaming "
                "data without max_steps, or max_epochs=-1): set the run length (Trainer(max_steps"
                "=...)), or give the phase explicitly in steps (phase mode 'explicit' with decay "
                "and delay; SigmoidPhase(decay=..., delay=...))"
            )
        if total_steps is None and self.lr_schedule == "cosine":
            raise ValueError(
                "lr_schedule='cosine' needs the run length, which is unknown here: set "
                "Trainer(max_steps=...) or use lr_schedule='constant'"
            )

    # ------------------------------------------------------------------ the schedule

    @property
    def clock(self) -> int:
        """t: the optimizer's own step count (the scheduler's count for other optimizers)."""
        count = getattr(self.optimizer, "step_count", None)
        return int(count) if isinstance(count, int) else max(self.last_epoch, 0)

    def lr_factor(self, step: int) -> float:
        """``k_B * w(t) * a(t)``: what multiplies every group's base learning rate at ``step``."""
        plan = self.plan
        if step < self.warmup_steps:
            return plan.batch_scale * (step + 1) / (self.warmup_steps + 1)
        if self.lr_schedule == "constant" or plan.total_steps is None:
            return plan.batch_scale
        span = max(1, plan.total_steps - plan.anneal_start)
        progress = min(1.0, max(0.0, (step - plan.anneal_start) / span))
        final = self.final_lr_ratio
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return plan.batch_scale * (final + (plan.anneal_value - final) * cosine)

    def _anneal_value(self, step: int) -> float:
        """The annealing factor ``a(step)`` alone (without warm-up and batch scale)."""
        return self.lr_factor(max(step, self.warmup_steps)) / self.plan.batch_scale

    def get_lr(self) -> list[float]:  # type: ignore[override]
        factor = self.lr_factor(self.clock)
        return [
            base * group.get("lr_scale", 1.0) * factor
            for base, group in zip(self.base_lrs, self.optimizer.param_groups, strict=True)
        ]

    def _apply(self) -> None:
        """Write this step's learning rates into the groups and install the phase."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self._install_phase()

    def _install_phase(self) -> None:
        """Hand the phase in effect to a TVLARS optimizer (others have none)."""
        if hasattr(self.optimizer, "phase"):
            self.optimizer.phase = self._held or self.plan.phase
        elif self.plan.phase is not None:
            raise TypeError(
                f"a phase needs a TVLARS optimizer, got {type(self.optimizer).__name__}"
            )

    # ------------------------------------------------------------------ when the run changes

    def plan_for(
        self,
        total_steps: int | None,
        batch_scale: float,
        effective_batch_size: int | None = None,
    ) -> None:
        """Adapt the plan to the run as it is now, from the current step on, without a jump.

        * length: a fitted phase continues from its current value to ``decayed_by_end`` at the
          new end (:meth:`SigmoidPhase.continued`); a cosine continues from its current value
          to ``final_lr_ratio`` at the new end; an explicit phase does not depend on it;
        * batch: the learning rate follows the new batch scale from this step on.

        Each change is described in :attr:`changes`. The group learning rates are updated.
        """
        self._target = (total_steps, batch_scale, effective_batch_size)
        self._check_length(total_steps, self.fitted)
        t, plan = self.clock, self.plan
        new = plan
        if total_steps != plan.total_steps:
            phase = plan.phase
            if self.fitted is not None and total_steps is not None and plan.phase is not None:
                phase = (
                    self.fitted.fit(total_steps)
                    if t == 0
                    else plan.phase.continued(
                        t, total_steps, decayed_by_end=self.fitted.decayed_by_end
                    )
                )
            anneal_start, anneal_value = plan.anneal_start, plan.anneal_value
            if self.lr_schedule == "cosine" and t > self.warmup_steps:
                anneal_start, anneal_value = t, self._anneal_value(t)
            new = replace(
                new,
                total_steps=total_steps,
                phase=phase,
                anneal_start=anneal_start,
                anneal_value=anneal_value,
            )
            if t > 0:
                what = "phase unchanged"
                if phase is not plan.phase and phase is not None and total_steps is not None:
                    what = (
                        f"phase continues from {phase(t):.4g} to {phase(total_steps):.4g} at the "
                        "new end"
                    )
                if self.lr_schedule == "cosine":
                    what += ", cosine continues to the new end"
                self.changes.append(
                    f"run length {plan.total_steps} -> {total_steps} optimizer steps at step {t}: "
                    + what
                )
        if batch_scale != plan.batch_scale or effective_batch_size != plan.effective_batch_size:
            if t > 0 and batch_scale != plan.batch_scale:
                batch = (
                    f"effective batch {plan.effective_batch_size} -> {effective_batch_size}, "
                    if effective_batch_size is not None
                    else ""
                )
                self.changes.append(
                    f"{batch}learning-rate scale {plan.batch_scale:.6g} -> {batch_scale:.6g} "
                    f"from step {t}"
                )
            new = replace(
                new,
                batch_scale=check_positive("batch_scale", batch_scale),
                effective_batch_size=effective_batch_size,
            )
        self.plan = new
        self._apply()

    def hold_phase(self, hold: bool) -> None:
        """Freeze phi at its current value (``True``) or release it (e.g. during an LR sweep)."""
        phase = self.plan.phase
        self._held = ConstantPhase(phase(self.clock)) if hold and phase is not None else None
        self._install_phase()

    def set_base_lr(self, lr: float) -> None:
        """Replace the base learning rate of every group (e.g. with an LR finder's suggestion)."""
        self.base_lrs = [check_positive("lr", lr)] * len(self.base_lrs)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
        self._apply()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        plan = self.plan
        phase = plan.phase
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "total_steps": plan.total_steps,
            "batch_scale": plan.batch_scale,
            "effective_batch_size": plan.effective_batch_size,
            "phase": None
            if phase is None
            else [phase.alpha, phase.decay, phase.delay, phase.floor],
            "anneal_start": plan.anneal_start,
            "anneal_value": plan.anneal_value,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the plan of the saved run, then adapt it to this run (see :meth:`plan_for`).

        Resuming the same run changes nothing (bit-for-bit); a changed run is re-planned from
        the restored step on, and the changes are listed in :attr:`changes`.
        """
        phase = state_dict["phase"]
        self.last_epoch = state_dict["last_epoch"]
        self.base_lrs = list(state_dict["base_lrs"])
        self.plan = Plan(
            total_steps=state_dict["total_steps"],
            batch_scale=state_dict["batch_scale"],
            effective_batch_size=state_dict["effective_batch_size"],
            phase=None if phase is None else SigmoidPhase(*phase),
            anneal_start=state_dict["anneal_start"],
            anneal_value=state_dict["anneal_value"],
        )
        self.plan_for(*self._target)

    def describe(self) -> str:
        """One sentence about the plan in effect."""
        plan = self.plan
        length = "unknown length" if plan.total_steps is None else f"{plan.total_steps} steps"
        phase = "no phase (LARS)" if plan.phase is None else f"phase {plan.phase!r}"
        return (
            f"{length}, learning-rate scale {plan.batch_scale:.6g}, {self.lr_schedule} LR, {phase}"
        )
