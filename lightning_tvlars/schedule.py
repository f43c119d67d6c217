r"""``TVLARSScheduler``: the one owner of everything in a run that depends on the run.

For optimizer step :math:`t` (the optimizer's own clock, :attr:`~lightning_tvlars.TVLARS.
step_count`) it sets, for every parameter group :math:`g`,

.. math::

    \eta_g(t) = \eta_{base} \cdot \text{lr\_scale}_g \cdot k_B \cdot a(t)

with :math:`k_B` the batch factor of the scaling rule (``linear``: :math:`B / B_0`, ``sqrt``:
:math:`\sqrt{B / B_0}`, ``none``: 1) for the effective batch :math:`B`, ``lr_scale`` the
per-group multiplier (the group key timm uses), and :math:`a(t)` a linear warm-up over
``warmup_fraction`` of the run followed by the annealing: ``constant`` 1, ``cosine`` or
``polynomial`` (``(1 - p)^lr_power``, MLPerf's LARS decay) to ``final_lr_ratio`` at the end.
With ``lr_schedule="external"`` the learning rate belongs to a scheduler of the user's: this one
writes the batch-scaled rate once, when it is built, and never again. It also owns the phase
:math:`\phi(t)` of the family's optimizers: fitted to the run (:class:`FittedPhase`), explicit
(a fixed :class:`~lightning_tvlars.SigmoidPhase`), or none.

The learning rate is written into the groups before every optimizer step (an optimizer
step-pre hook), after it (a step-post hook: the rate of the next step) and after
:meth:`~TVLARSScheduler.step`, so the rate a step applies is always the rate of its own ``t``
and the groups show it between steps, whether or not ``step()`` is called. A rate that
something else wrote (a second scheduler, a callback) is refused at the next step: two owners
of the learning rate are never silently combined.

A group whose rate is a tensor (``lr=torch.tensor(...)``, or ``capturable=True``) gets it
written in place (``fill_``: the tensor a compiled or captured step reads is never replaced, and
never read back) by :meth:`~TVLARSScheduler.step` and when the plan changes, not by the hooks:
the step stays free of host values, so call ``step()`` after every optimizer step, as for
torch's schedulers (Lightning and the Fabric adapter do). With ``capturable=True`` the clock is
then this scheduler's own count of ``step()`` calls (the optimizer's ``t`` is on the device);
the phase is computed on the device from the optimizer's ``t``. A rate replaced by another
object is refused as above; one written in place by someone else cannot be seen without a host
read.

The run a schedule is planned for can change (a resume into a longer run, another batch size
or device count, an accumulation schedule, a time budget). :meth:`~TVLARSScheduler.plan_for`
re-plans without a jump: the warm-up and the annealing continue from their current value to
their new ends, a fitted phase continues from its current value to its end, the batch factor
follows the new batch; every change is described in :attr:`~TVLARSScheduler.changes`. A run
whose annealing has already ended cannot be extended (the learning rate would stay at its
final value): that is refused with a message saying how to start a new schedule. The
``state_dict`` holds only numbers, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_tvlars._validation import (
    check_choice,
    check_non_negative,
    check_open_interval,
    check_positive,
    check_positive_int,
    check_unit_interval,
)
from lightning_tvlars.phase import ConstantPhase, SigmoidPhase

ScalingRule = Literal["linear", "sqrt", "none"]
SCALING_RULES: tuple[str, ...] = ("linear", "sqrt", "none")
LRSchedule = Literal["constant", "cosine", "polynomial", "external"]
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "polynomial", "external")
#: The schedules that anneal to ``final_lr_ratio`` at the end of the run (they need its length).
ANNEALING: tuple[str, ...] = ("cosine", "polynomial")


def batch_factor(rule: ScalingRule, effective_batch_size: int, base_batch_size: int) -> float:
    """``k_B`` of the scaling rule: the learning rate at ``effective_batch_size`` over the one
    given for ``base_batch_size`` (``linear``: Goyal et al. 2017; ``sqrt``: Krizhevsky 2014,
    common for LAMB and Adam; ``none``: 1).

    >>> batch_factor("linear", 4096, 256), batch_factor("sqrt", 4096, 256)
    (16.0, 4.0)
    """
    ratio = check_positive_int("effective_batch_size", effective_batch_size) / check_positive_int(
        "base_batch_size", base_batch_size
    )
    check_choice("lr_scaling", rule, SCALING_RULES)
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


@dataclass(frozen=True)
class FittedPhase:
    """A phase fitted to the run length: halfway between ceiling and floor at ``half_at`` of it,
    ``decayed_by_end`` of the way down at its end (see
    :meth:`~lightning_tvlars.SigmoidPhase.from_training_length`)."""

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


#: How a schedule is told its phase: fitted to the run, a fixed phase in steps, or none.
PhaseSpec = FittedPhase | SigmoidPhase | None


@dataclass(frozen=True)
class Plan:
    """What the schedule follows now (a snapshot; see :attr:`TVLARSScheduler.plan`).

    Attributes:
        total_steps: optimizer steps of the run (``None``: unknown).
        effective_batch_size: the batch the learning rate is scaled for (``None``: not given).
        batch_scale: ``k_B``, the factor of that batch.
        phase: the phase in effect (``None``: phi == 1).
        warmup_steps: the linear warm-up ends at this step.
        start, start_value: where the learning-rate factor's current segment starts: at
            ``(-1, 0)`` for a new run (the warm-up rises along ``(t + 1) / (warmup + 1)``), at
            the step of the last re-plan and its factor there after one.
    """

    total_steps: int | None
    effective_batch_size: int | None
    batch_scale: float
    phase: SigmoidPhase | None
    warmup_steps: int = 0
    start: int = -1
    start_value: float = 0.0


class TVLARSScheduler(LRScheduler):
    """Learning rate and phase of one optimizer, as functions of its step count.

    Args:
        optimizer: TVLARS or LAMB (their ``phase`` is set from here), or any optimizer for a
            learning-rate-only schedule.
        total_steps: the optimizer steps this run will take; needed by a fitted phase, a
            warm-up and annealing. ``None`` when unknown.
        effective_batch_size: the batch one optimizer step averages over (per device x
            data-parallel replicas x accumulation); with ``lr_scaling``, the learning rate is
            scaled for it.
        lr_scaling: ``linear``, ``sqrt`` or ``none`` (the default: the groups' rates as given).
        base_batch_size: the batch the optimizer's learning rates are given for.
        phase: :class:`FittedPhase`, a :class:`~lightning_tvlars.SigmoidPhase` (in steps) or
            ``None`` (phi == 1). It replaces the optimizer's own phase, which must then be the
            same (or none): a phase given twice is refused.
        warmup_fraction: a linear warm-up over this fraction of the run, in [0, 1).
        lr_schedule: ``constant``, ``cosine``, ``polynomial``, or ``external`` (see the module
            docstring).
        final_lr_ratio: where ``cosine`` and ``polynomial`` end, as a fraction of the peak.
        lr_power: the power of ``polynomial``.

    Raises:
        ValueError: a fitted phase, a warm-up or annealing without a run length; a phase given
            twice; bad values.

    Examples:
        >>> import torch
        >>> from lightning_tvlars import TVLARS
        >>> opt = TVLARS([torch.nn.Parameter(torch.ones(3))], lr=0.5)
        >>> sched = TVLARSScheduler(opt, total_steps=100, effective_batch_size=1024,
        ...                         lr_scaling="linear", phase=FittedPhase())
        >>> opt.param_groups[0]["lr"], round(opt.phase(50), 3), round(opt.phase(100), 3)
        (2.0, 0.5, 0.01)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_steps: int | None,
        effective_batch_size: int | None = None,
        lr_scaling: ScalingRule = "none",
        base_batch_size: int = 256,
        phase: PhaseSpec = None,
        warmup_fraction: float = 0.0,
        lr_schedule: LRSchedule = "constant",
        final_lr_ratio: float = 1e-3,
        lr_power: float = 2.0,
    ) -> None:
        if phase is not None and not isinstance(phase, FittedPhase | SigmoidPhase):
            raise TypeError(
                f"phase={phase!r} is invalid: expected a FittedPhase, a SigmoidPhase or None"
            )
        held = getattr(optimizer, "phase", None)
        if held is not None and held != phase:
            raise ValueError(
                f"the optimizer already holds phase {held!r}, and TVLARSScheduler(phase={phase!r}) "
                "would replace it: give the phase to the scheduler only (phase=...), and build "
                "the optimizer without one"
            )
        if phase is not None and not hasattr(optimizer, "phase"):
            raise TypeError(f"a phase needs TVLARS or LAMB, got {type(optimizer).__name__}")
        self.lr_scaling = check_choice("lr_scaling", lr_scaling, SCALING_RULES)
        self.base_batch_size = check_positive_int("base_batch_size", base_batch_size)
        self.lr_schedule = check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        self.warmup_fraction = check_unit_interval("warmup_fraction", warmup_fraction)
        self.final_lr_ratio = check_non_negative("final_lr_ratio", final_lr_ratio)
        self.lr_power = check_positive("lr_power", lr_power)
        if self.external and self.warmup_fraction:
            raise ValueError(
                f"warmup_fraction={warmup_fraction!r} has no effect with lr_schedule='external' "
                "(your scheduler owns the learning rate): remove it or warm up in your scheduler"
            )
        self.fitted = phase if isinstance(phase, FittedPhase) else None
        self._explicit = phase if isinstance(phase, SigmoidPhase) else None
        self._check_length(total_steps)
        self.plan = self._new_plan(total_steps, effective_batch_size)
        #: What the run looks like now (kept on load_state_dict, unlike ``plan``).
        self._target = (total_steps, effective_batch_size)
        #: Plain sentences about what was re-planned, for the caller to log and clear.
        self.changes: list[str] = []
        self._paused: Callable[[], bool] | None = None
        self._held: ConstantPhase | None = None
        # What this scheduler last wrote into the groups (a tensor rate: the tensor itself).
        self._written: list[float | Tensor] | None = None
        wrapped = "step" in vars(optimizer)
        super().__init__(optimizer)
        if not wrapped and getattr(vars(optimizer).get("step"), "_wrapped_by_lr_sched", False):
            # torch's LRScheduler wraps optimizer.step to count calls for a warning of its own
            # step() (which this one replaces), in a function torch.compile refuses to trace:
            # ``torch.compile(optimizer.step, fullgraph=True)`` needs the optimizer's own step.
            del optimizer.step
        # torch keeps tensor base rates as tensors: read them once, here, never per step.
        self.base_lrs = [float(b) for b in self.base_lrs]
        self._install_phase()
        if self.external:
            self._hand_over_the_rate()
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def _hand_over_the_rate(self) -> None:
        """``external``: write the batch-scaled rate once, as the groups' rate and their
        ``initial_lr``, the rate torch's schedulers start from (``LambdaLR``, ``SequentialLR``
        and the closed forms read ``initial_lr``; without it they would start from the
        unscaled base rate)."""
        scaled = [
            float(b) * self._group_scale(i) * self.batch_scale for i, b in enumerate(self.base_lrs)
        ]
        self._write(scaled)
        for group, lr in zip(self.optimizer.param_groups, scaled, strict=True):
            group["initial_lr"] = lr
        self._written = None

    # ------------------------------------------------------------------ the plan

    @property
    def external(self) -> bool:
        """Whether a scheduler of the user's owns the learning rate."""
        return self.lr_schedule == "external"

    def _check_length(self, total_steps: int | None) -> None:
        if total_steps is not None:
            check_positive_int("total_steps", total_steps)
            return
        needs = []
        if self.fitted is not None:
            needs.append("a phase fitted to the run")
        if self.warmup_fraction:
            needs.append(f"warmup_fraction={self.warmup_fraction!r}")
        if self.lr_schedule in ANNEALING:
            needs.append(f"lr_schedule={self.lr_schedule!r}")
        if needs:
            raise ValueError(
                f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''} the run length, "
                "which is unknown here: state it (total_steps=..., in a config "
                "TVLARSConfig(total_steps=...) or Trainer(max_steps=...)), or give the phase "
                "explicitly in steps (SigmoidPhase(decay=..., delay=...)) and use a constant "
                "learning rate without a warm-up"
            )

    def _batch_scale(self, effective_batch_size: int | None) -> float:
        if effective_batch_size is None or self.lr_scaling == "none":
            return 1.0
        return batch_factor(self.lr_scaling, effective_batch_size, self.base_batch_size)  # type: ignore[arg-type]

    def _warmup(self, total_steps: int | None) -> int:
        return round(self.warmup_fraction * total_steps) if total_steps else 0

    def _phase_for(self, total_steps: int | None) -> SigmoidPhase | None:
        if self.fitted is not None and total_steps is not None:
            return self.fitted.fit(total_steps)
        return self._explicit

    def _new_plan(self, total_steps: int | None, effective_batch_size: int | None) -> Plan:
        return Plan(
            total_steps=total_steps,
            effective_batch_size=effective_batch_size,
            batch_scale=self._batch_scale(effective_batch_size),
            phase=self._phase_for(total_steps),
            warmup_steps=self._warmup(total_steps),
        )

    @property
    def clock(self) -> int:
        """t: the optimizer's own step count; this scheduler's count of ``step()`` calls for
        other optimizers and for a capturable one (whose ``t`` is on the device)."""
        if not getattr(self.optimizer, "capturable", False):
            count = getattr(self.optimizer, "step_count", None)
            if isinstance(count, int):
                return count
        return max(self.last_epoch, 0)

    def lr_factor(self, step: int) -> float:
        """``a(t)``: the warm-up and annealing factor at ``step`` (without the batch factor)."""
        plan = self.plan
        end = plan.warmup_steps
        if step < end:  # rising from the segment's start to 1 at the end of the warm-up
            return plan.start_value + (1.0 - plan.start_value) * (step - plan.start) / (
                end - plan.start
            )
        start, value = (end, 1.0) if plan.start < end else (plan.start, plan.start_value)
        if self.lr_schedule not in ANNEALING or plan.total_steps is None:
            return value
        progress = min(1.0, max(0.0, (step - start) / max(1, plan.total_steps - start)))
        final = self.final_lr_ratio
        if self.lr_schedule == "cosine":
            return final + (value - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return final + (value - final) * (1.0 - progress) ** self.lr_power

    @property
    def batch_scale(self) -> float:
        """``k_B`` of the run as it is now."""
        return self.plan.batch_scale

    def applied_lr(self, step: int | None = None, group: int = 0) -> float:
        """The learning rate group ``group`` applies at ``step`` (default: the next step)."""
        if self.external:
            return float(self.optimizer.param_groups[group]["lr"])
        t = self.clock if step is None else step
        base = float(self.base_lrs[group])
        return base * self._group_scale(group) * self.batch_scale * self.lr_factor(t)

    def base_lr_for(self, applied_lr: float) -> float:
        """The base learning rate (at ``base_batch_size``) of an applied one at this batch."""
        return check_positive("lr", applied_lr) / self.batch_scale

    def _group_scale(self, index: int) -> float:
        return float(self.optimizer.param_groups[index].get("lr_scale", 1.0))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self.applied_lr(group=i) for i in range(len(self.base_lrs))]

    # ------------------------------------------------------------------ writing it

    def step(self, epoch: int | None = None) -> None:
        """Advance (as torch's schedulers do) and write the rates of the next step."""
        if epoch is not None:
            raise TypeError("TVLARSScheduler follows the optimizer's step count: call step()")
        self.last_epoch += 1
        self._apply()

    def _write(self, rates: list[float], *, in_step: bool = False) -> None:
        """Write ``rates`` into the groups: floats replace the groups' rates, tensor rates are
        filled in place; ``in_step`` (the optimizer's hooks) leaves tensor rates alone."""
        written: list[float | Tensor] = []
        for group, lr in zip(self.optimizer.param_groups, rates, strict=True):
            current = group["lr"]
            if not isinstance(current, Tensor):
                group["lr"] = lr
                written.append(lr)
                continue
            if not in_step:
                current.fill_(lr)
            written.append(current)
        self._last_lr = list(rates)
        self._written = written

    def _apply(self, *, in_step: bool = False) -> None:
        """Write this step's learning rates (unless external) and install the phase; from the
        optimizer's hooks (``in_step``) only float rates, so that a step with tensor rates
        computes nothing on the host (the clock, the rates)."""
        groups = self.optimizer.param_groups
        tensors_only = all(isinstance(g["lr"], Tensor) for g in groups)
        if not self.external and not self.paused and not (in_step and tensors_only):
            self._write(self.get_lr(), in_step=in_step)
        self._install_phase()

    def _install_phase(self) -> None:
        if hasattr(self.optimizer, "phase"):
            self.optimizer.phase = self._held or self.plan.phase

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Before every optimizer step: hold during a pause, refuse a rate written by someone
        else, then write the rate of this step."""
        if self.paused:
            if self._held is None:
                self.hold_phase(True)
            return
        if self._held is not None:
            self.hold_phase(False)
        if self.external:
            return
        if self._written is not None:
            for i, (group, lr) in enumerate(
                zip(optimizer.param_groups, self._written, strict=False)
            ):
                current = group["lr"]
                tensors = isinstance(lr, Tensor) or isinstance(current, Tensor)
                if (current is not lr) if tensors else (current != lr):
                    raise ValueError(
                        f"the learning rate of group {i} is {group['lr']!r}, but TVLARSScheduler "
                        f"set {lr!r}: something else wrote it (a second LR scheduler on this "
                        "optimizer?). One owner: give the learning rate to your scheduler with "
                        "lr_schedule='external' (TVLARS then keeps the phase and the batch-scaled "
                        "starting rate), or let TVLARSScheduler schedule it (warmup_fraction, "
                        "lr_schedule='cosine' or 'polynomial'); change the base rate with "
                        "set_base_lr"
                    )
        self._apply(in_step=True)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """After every optimizer step: write the rate of the next one, so that the groups show
        the rate the next step applies whether or not ``step()`` is called (manual
        optimization, a loop of one's own); tensor rates wait for ``step()``."""
        self._apply(in_step=True)

    @property
    def paused(self) -> bool:
        return self._paused is not None and self._paused()

    def pause_while(self, predicate: Callable[[], bool] | None) -> None:
        """While ``predicate()`` is true (e.g. an LR finder's sweep, which writes the rates
        itself), hold phi at its current value and leave the rates alone."""
        self._paused = predicate

    def hold_phase(self, hold: bool) -> None:
        """Freeze phi at its current value (``True``) or release it."""
        phase = self.plan.phase
        self._held = ConstantPhase(phase(self.clock)) if hold and phase is not None else None
        self._install_phase()

    def set_base_lr(self, lr: float) -> None:
        """Replace the base learning rate of every group (e.g. with an LR finder's suggestion
        in base-batch units: :meth:`base_lr_for`)."""
        self.base_lrs = [check_positive("lr", lr)] * len(self.base_lrs)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
        self._written = None
        self._apply()

    # ------------------------------------------------------------------ when the run changes

    def plan_for(self, total_steps: int | None, effective_batch_size: int | None = None) -> None:
        """Adapt the plan to the run as it is now, from the current step on, without a jump
        (see the module docstring); each change is described in :attr:`changes`."""
        self._target = (total_steps, effective_batch_size)
        self._check_length(total_steps)
        t, plan = self.clock, self.plan
        if t == 0:
            self.plan = self._new_plan(total_steps, effective_batch_size)
            self._apply()
            return
        new = plan
        if total_steps != plan.total_steps:
            new = self._replan_length(t, total_steps)
        if effective_batch_size != plan.effective_batch_size:
            scale = self._batch_scale(effective_batch_size)
            if scale != plan.batch_scale or (self.external and self.lr_scaling != "none"):
                self.changes.append(self._describe_batch(t, plan, effective_batch_size, scale))
            new = replace(new, effective_batch_size=effective_batch_size, batch_scale=scale)
        self.plan = new
        self._written = None
        self._apply()

    def _replan_length(self, t: int, total_steps: int | None) -> Plan:
        plan = self.plan
        ended = plan.total_steps is not None and t >= plan.total_steps
        if ended and self.lr_schedule in ANNEALING and (total_steps or math.inf) > t:
            raise ValueError(
                f"this run's schedule ended at step {plan.total_steps} ({self.lr_schedule} "
                f"learning rate at its final value, {self.final_lr_ratio:g} x the peak), and "
                f"the run now goes on to {total_steps or 'an unknown length'}: a finished "
                "schedule cannot be continued. Start a new one from these weights: load the "
                "checkpoint's model weights and fit again without ckpt_path (see "
                "docs/run-changes.md, 'Extending a finished run')"
            )
        phase = plan.phase
        what = "no phase" if phase is None else "phase unchanged"
        if self.fitted is not None and total_steps is not None and phase is not None:
            phase = phase.continued(t, total_steps, decayed_by_end=self.fitted.decayed_by_end)
            if phase is plan.phase:
                what = f"phase stays on its course (already {phase(t):.4g}, near its end)"
            else:
                what = f"phase continues from {phase(t):.4g} to {phase(total_steps):.4g} at the end"
        value = self.lr_factor(t)
        warmup = self._warmup(total_steps)
        if t >= plan.warmup_steps:  # a warm-up that has ended does not start again
            warmup = plan.warmup_steps
        elif warmup > t:
            what += f", warm-up continues to step {warmup}"
        else:
            what += f", warm-up ends now (at {value:.4g} x the peak)"
        if self.lr_schedule in ANNEALING:
            what += f", {self.lr_schedule} continues to the new end"
        self.changes.append(
            f"run length {plan.total_steps} -> {total_steps} optimizer steps at step {t}: {what}"
        )
        return replace(
            plan,
            total_steps=total_steps,
            phase=phase,
            warmup_steps=warmup,
            start=t,
            start_value=value,
        )

    def _describe_batch(self, t: int, plan: Plan, batch: int | None, scale: float) -> str:
        change = f"effective batch {plan.effective_batch_size} -> {batch} from step {t}"
        if self.external:
            return (
                f"{change}: your scheduler owns the learning rate, which TVLARS leaves as it is "
                f"(the {self.lr_scaling} rule would scale it by {scale / plan.batch_scale:.6g})"
            )
        return f"{change}: learning-rate scale {plan.batch_scale:.6g} -> {scale:.6g}"

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        plan = self.plan
        phase = plan.phase
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "total_steps": plan.total_steps,
            "effective_batch_size": plan.effective_batch_size,
            "batch_scale": plan.batch_scale,
            "phase": None
            if phase is None
            else [phase.alpha, phase.decay, phase.delay, phase.floor],
            "warmup_steps": plan.warmup_steps,
            "start": plan.start,
            "start_value": plan.start_value,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the plan of the saved run, then adapt it to this run (see :meth:`plan_for`).

        Resuming the same run changes nothing (bit-for-bit); a changed run is re-planned from
        the restored step on, and the changes are listed in :attr:`changes`.
        """
        phase = state_dict["phase"]
        self.last_epoch = state_dict["last_epoch"]
        self.base_lrs = list(state_dict["base_lrs"])
        start, value = state_dict.get("start", -1), state_dict.get("start_value", 0.0)
        if "anneal_start" in state_dict and state_dict["anneal_value"] != 1.0:  # 0.2.0-dev
            start, value = state_dict["anneal_start"], state_dict["anneal_value"]
        self.plan = Plan(
            total_steps=state_dict["total_steps"],
            effective_batch_size=state_dict["effective_batch_size"],
            batch_scale=state_dict["batch_scale"],
            phase=None if phase is None else SigmoidPhase(*phase),
            warmup_steps=state_dict.get("warmup_steps", self._warmup(state_dict["total_steps"])),
            start=start,
            start_value=value,
        )
        self._written = None
        self.plan_for(*self._target)

    # ------------------------------------------------------------------ words

    def describe(self) -> str:
        """One sentence about the plan in effect."""
        plan = self.plan
        parts = ["unknown length" if plan.total_steps is None else f"{plan.total_steps} steps"]
        if plan.warmup_steps:
            parts.append(f"linear warm-up over {plan.warmup_steps} steps")
        if self.external:
            parts.append(
                "learning rate: your scheduler's (it starts from the batch-scaled rate; "
                "TVLARS keeps the phase)"
            )
        elif self.lr_schedule in ANNEALING:
            power = f" (power {self.lr_power:g})" if self.lr_schedule == "polynomial" else ""
            parts.append(f"{self.lr_schedule}{power} LR to {self.final_lr_ratio:g} x the peak")
        else:
            parts.append("constant LR")
        parts.append("no phase (phi = 1)" if plan.phase is None else f"phase {plan.phase!r}")
        return ", ".join(parts)

    def describe_lr(self) -> str:
        """How the learning rate of the first group follows from the base rate and the batch."""
        base = self.base_lrs[0]
        batch, rule = self.plan.effective_batch_size, self.lr_scaling
        how = {
            "linear": f"x {batch}/{self.base_batch_size}",
            "sqrt": f"x sqrt({batch}/{self.base_batch_size})",
            "none": "(no scaling)",
        }[rule if batch is not None else "none"]
        peak = base * self._group_scale(0) * self.batch_scale
        return f"learning rate {peak:.6g} = {base:.6g} {how} ({rule} scaling)"
