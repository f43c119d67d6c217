r"""The time-varying phase :math:`\phi(t)` of TVLARS.

.. math::

    \phi(t) = \frac{1}{\alpha + e^{\lambda (t - d)}} + \gamma_{\min}

``alpha`` sets the ceiling (:math:`\phi \to 1/\alpha + \gamma_{\min}` long before the delay),
``decay`` (:math:`\lambda`) the steepness, ``delay`` (:math:`d`) the centre of the decay in
optimizer steps and ``floor`` (:math:`\gamma_{\min}`) the value TVLARS settles to, where it
behaves like LARS with its trust ratio scaled by ``floor``.

:math:`\phi` is a pure function of the step count, evaluated on the host in float64, so the
optimizer never reads a device value to get it; a capturable step (and a compiled one) evaluates
the same formula on the device from its own step count, in float64 there too
(:meth:`SigmoidPhase.tensor`). It is overflow-safe: where :math:`e^{\lambda(t-d)}` would overflow
a float64, :math:`\phi` is exactly ``floor``; it is never ``inf`` or ``nan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_tvlars._validation import (
    check_non_negative,
    check_open_interval,
    check_positive,
    check_positive_int,
    check_real,
    check_unit_interval,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes

# exp(x) overflows a float64 for x above log(max float64) ~ 709.78.
_MAX_EXP_ARG = math.log(2.0**1023 * (2.0 - 2.0**-52))


@dataclass(frozen=True, repr=False)
class SigmoidPhase:
    """``phi(t) = 1 / (alpha + exp(decay * (t - delay))) + floor``.

    Args:
        alpha: > 0; the ceiling is ``1 / alpha + floor``.
        decay: >= 0, the steepness ``lambda`` per optimizer step (0 keeps phi constant).
        delay: the step at the centre of the decay (any finite number; the authors' code uses -1).
        floor: >= 0, the value phi decays to (``gamma_min`` in the paper).

    Examples:
        >>> phase = SigmoidPhase(alpha=1.0, decay=0.01, delay=500.0)
        >>> round(phase(0), 4), phase(500), round(phase(10_000), 6)
        (0.9933, 0.5, 0.0)
        >>> SigmoidPhase.from_milestones(half_step=1000, end_step=2000)
        SigmoidPhase(alpha=1, decay=0.00459512, delay=1000, floor=0)
    """

    alpha: float = 1.0
    decay: float = 1e-3
    delay: float = 0.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        # Normalise to floats so that repr, equality and hashing do not depend on int vs float.
        object.__setattr__(self, "alpha", check_positive("alpha", self.alpha))
        object.__setattr__(self, "decay", check_non_negative("decay", self.decay))
        object.__setattr__(self, "delay", check_real("delay", self.delay))
        object.__setattr__(self, "floor", check_non_negative("floor", self.floor))

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={getattr(self, k):.6g}" for k in ("alpha", "decay", "delay", "floor")
        )
        return f"SigmoidPhase({fields})"

    def __call__(self, step: float) -> float:
        """phi at optimizer step ``step`` (0 for the first step), as a Python float."""
        exponent = self.decay * (float(step) - self.delay)
        if exponent > _MAX_EXP_ARG:
            return self.floor
        return 1.0 / (self.alpha + math.exp(exponent)) + self.floor

    def tensor(self, step: Tensor) -> Tensor:
        """phi as a tensor operation on ``step``'s device, for a capturable step, traced code
        (``torch.compile``) and CUDA graphs: the float64 formula of :meth:`__call__`.

        ``exp`` overflowing to ``inf`` gives ``1 / inf == 0``: exactly ``floor``, never nan.
        """
        exponent = (step.to(_device_float(step)) - self.delay) * self.decay
        return torch.reciprocal(torch.exp(exponent) + self.alpha) + self.floor

    @property
    def ceiling(self) -> float:
        """The supremum of phi, reached long before the delay: ``1 / alpha + floor``."""
        return 1.0 / self.alpha + self.floor

    @property
    def half_step(self) -> float:
        """The step where phi is halfway between its ceiling and its floor.

        ``1 / (alpha + e^x) = 1 / (2 alpha)`` gives ``x = ln(alpha)``, so the half step is
        ``delay + ln(alpha) / decay`` (``inf`` when ``decay == 0``).
        """
        if self.decay == 0:
            return math.inf
        return self.delay + math.log(self.alpha) / self.decay

    @classmethod
    def from_milestones(
        cls,
        half_step: float,
        end_step: float,
        *,
        decayed_by_end: float = 0.99,
        alpha: float = 1.0,
        floor: float = 0.0,
    ) -> SigmoidPhase:
        """Build the phase from intent instead of ``decay`` and ``delay``.

        phi is halfway between ceiling and floor at ``half_step`` and has covered
        ``decayed_by_end`` of the way from ceiling to floor at ``end_step``.

        With ``s = phi - floor`` and ceiling ``1/alpha``, having covered a fraction ``q`` means
        ``1 / (alpha + e^x) = (1 - q) / alpha``, i.e. ``x = ln(alpha q / (1 - q))``. The two
        milestones then give ``decay = ln(q / (1 - q)) / (end_step - half_step)`` and
        ``delay = half_step - ln(alpha) / decay``.
        """
        half = check_non_negative("half_step", half_step)
        end = check_real("end_step", end_step)
        if end <= half:
            raise ValueError(
                f"end_step={end_step!r} is invalid: expected a step after half_step={half_step!r}"
            )
        q = check_open_interval("decayed_by_end", decayed_by_end, 0.5, 1.0)
        alpha = check_positive("alpha", alpha)
        decay = math.log(q / (1.0 - q)) / (end - half)
        return cls(alpha=alpha, decay=decay, delay=half - math.log(alpha) / decay, floor=floor)

    @classmethod
    def from_training_length(
        cls,
        total_steps: int,
        *,
        half_at: float = 0.5,
        decayed_by_end: float = 0.99,
        alpha: float = 1.0,
        floor: float = 0.0,
    ) -> SigmoidPhase:
        """A phase scaled to a run: halfway at ``half_at`` of it, ``decayed_by_end`` at its end."""
        total = check_positive_int("total_steps", total_steps)
        frac = check_unit_interval("half_at", half_at)
        return cls.from_milestones(
            frac * total, total, decayed_by_end=decayed_by_end, alpha=alpha, floor=floor
        )

    def continued(
        self, step: int, end_step: float, *, decayed_by_end: float = 0.99
    ) -> SigmoidPhase:
        """The phase with the same ceiling and floor that takes over at ``step`` without a jump.

        It passes through ``(step, phi(step))`` and has covered ``decayed_by_end`` of the way
        from ceiling to floor at ``end_step``: what a run that gets longer (or shorter) needs.
        With ``s = phi - floor``, ``1/(alpha + e^{lambda (t - d)}) = s`` at both points gives
        ``lambda = ln(A_1 / A_0) / (end_step - step)`` with ``A_0 = 1/s(step) - alpha`` and
        ``A_1 = alpha q / (1 - q)``, then ``d = step - ln(A_0) / lambda``. If phi has already
        decayed that far at ``step`` (within a relative 1e-6: at its own end, continuing would
        stretch it into a flat line of decay ~1e-17), or ``end_step <= step``, it keeps ``self``,
        which goes on decaying towards the floor.
        """
        q = check_open_interval("decayed_by_end", decayed_by_end, 0.5, 1.0)
        s0 = self(step) - self.floor
        a0 = 1.0 / s0 - self.alpha if s0 > 0 else math.inf
        a1 = self.alpha * q / (1.0 - q)
        if end_step <= step or not 0 < a0 < a1 / (1.0 + 1e-6):
            return self
        decay = math.log(a1 / a0) / (end_step - step)
        return SigmoidPhase(self.alpha, decay, step - math.log(a0) / decay, self.floor)

    @classmethod
    def reference(cls, decay: float) -> SigmoidPhase:
        """The phase of the authors' code: ``1 / (0.1 + exp(decay * (t + 1)))``."""
        return cls(alpha=0.1, decay=decay, delay=-1.0, floor=0.0)

    def values(self, steps: int) -> list[float]:
        """phi at steps ``0 .. steps - 1``."""
        return [self(t) for t in range(check_positive_int("steps", steps))]

    def plot(self, steps: int, ax: Axes | None = None, **line_kwargs: Any) -> Axes:
        """Plot phi over ``steps`` optimizer steps with matplotlib; returns the axes."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:  # pragma: no cover - matplotlib ships with the dependencies
            raise ImportError("SigmoidPhase.plot needs matplotlib: pip install matplotlib") from err
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        line_kwargs.setdefault("label", repr(self))
        ax.plot(range(steps), self.values(steps), **line_kwargs)
        ax.set_xlabel("optimizer step t")
        ax.set_ylabel("phi(t)")
        return ax


@dataclass(frozen=True)
class ConstantPhase:
    """phi(t) = ``value`` for every step (used to hold the phase, e.g. during an LR sweep)."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check_non_negative("value", self.value))

    def __call__(self, step: float) -> float:
        return self.value

    def tensor(self, step: Tensor) -> Tensor:
        """The same value as a tensor op on ``step``'s device, for traced code."""
        return torch.full_like(step, self.value, dtype=_device_float(step))


def _device_float(step: Tensor) -> torch.dtype:
    """float64 for the phase's arithmetic, but where the device has none (Apple's MPS)."""
    return torch.float32 if step.device.type == "mps" else torch.float64
