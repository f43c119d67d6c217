"""SigmoidPhase: values, monotonicity, overflow, constructors from intent, bad input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_tvlars import SigmoidPhase

phases = st.builds(
    SigmoidPhase,
    alpha=st.floats(1e-3, 1e3),
    decay=st.floats(0, 10),
    delay=st.floats(-1e6, 1e6),
    floor=st.floats(0, 10),
)


def test_values_follow_the_formula() -> None:
    phase = SigmoidPhase(alpha=0.5, decay=0.01, delay=100, floor=0.1)
    for t in (0, 50, 100, 1000):
        assert phase(t) == pytest.approx(1 / (0.5 + math.exp(0.01 * (t - 100))) + 0.1, rel=1e-15)
    assert SigmoidPhase(alpha=1, decay=1, delay=7)(7) == 0.5


@given(phases, st.integers(0, 10**9), st.integers(0, 10**9))
def test_phase_is_finite_bounded_and_non_increasing(phase: SigmoidPhase, a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    v_lo, v_hi = phase(lo), phase(hi)
    assert math.isfinite(v_lo) and math.isfinite(v_hi)
    assert phase.floor <= v_hi <= v_lo <= phase.ceiling


@given(phases)
def test_far_past_the_delay_phi_is_exactly_the_floor(phase: SigmoidPhase) -> None:
    if phase.decay > 0:
        t = phase.delay + 710 / phase.decay + 1
        assert phase(t) == phase.floor
    else:
        assert phase(10**12) == pytest.approx(1 / (phase.alpha + 1) + phase.floor)


def test_overflow_does_not_raise_for_huge_steps() -> None:
    phase = SigmoidPhase(decay=5.0)
    assert phase(10**300) == 0.0
    assert phase(float("1e308")) == 0.0


@given(
    half=st.integers(0, 10**6),
    width=st.integers(1, 10**6),
    q=st.floats(0.6, 0.999),
    alpha=st.floats(0.05, 20),
    floor=st.floats(0, 1),
)
def test_from_milestones_hits_both_milestones(
    half: int, width: int, q: float, alpha: float, floor: float
) -> None:
    phase = SigmoidPhase.from_milestones(
        half, half + width, decayed_by_end=q, alpha=alpha, floor=floor
    )
    span = 1 / alpha  # ceiling - floor
    assert phase(half) == pytest.approx(floor + span / 2, rel=1e-9)
    assert phase(half + width) == pytest.approx(floor + (1 - q) * span, rel=1e-9)
    assert phase.half_step == pytest.approx(half, abs=1e-6 * max(1, half))


def test_from_training_length_and_reference() -> None:
    phase = SigmoidPhase.from_training_length(1000, half_at=0.3)
    assert phase(300) == pytest.approx(0.5)
    assert phase(1000) == pytest.approx(0.01)
    ref = SigmoidPhase.reference(1e-3)
    assert ref(0) == pytest.approx(1 / (0.1 + math.exp(1e-3)))
    assert ref.ceiling == pytest.approx(10.0)


def test_repr_is_readable_and_values_plot() -> None:
    phase = SigmoidPhase(alpha=1, decay=0.004595119850134589, delay=1000)
    assert repr(phase) == "SigmoidPhase(alpha=1, decay=0.00459512, delay=1000, floor=0)"
    assert phase.values(3) == [phase(0), phase(1), phase(2)]
    ax = phase.plot(50)
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == phase.values(50)
    assert ax.get_xlabel() == "optimizer step t"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0}, "alpha=0 is invalid: expected a finite number > 0"),
        ({"alpha": -1.0}, "alpha=-1.0 is invalid"),
        ({"decay": -1e-3}, "decay=-0.001 is invalid: expected a finite number >= 0"),
        ({"floor": -0.1}, "floor=-0.1 is invalid"),
        ({"delay": float("inf")}, "delay=inf is invalid: expected a finite number"),
        ({"decay": float("nan")}, "decay=nan is invalid"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SigmoidPhase(**kwargs)


def test_bad_milestones_and_types() -> None:
    with pytest.raises(
        ValueError, match="end_step=5 is invalid: expected a step after half_step=10"
    ):
        SigmoidPhase.from_milestones(10, 5)
    with pytest.raises(ValueError, match=r"decayed_by_end=0.4 is invalid"):
        SigmoidPhase.from_milestones(0, 10, decayed_by_end=0.4)
    with pytest.raises(TypeError, match="alpha='1' is invalid: expected a real number"):
        SigmoidPhase(alpha="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total_steps=0 is invalid"):
        SigmoidPhase.from_training_length(0)
