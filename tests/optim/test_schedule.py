"""TVLARSScheduler without Lightning: the schedule, re-planning without a jump, checkpoints."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_tvlars import TVLARS, FittedPhase, SigmoidPhase, TVLARSScheduler


def _optimizer(groups: int = 1) -> TVLARS:
    return TVLARS(
        [
            {"params": [torch.nn.Parameter(torch.ones(3))], "lr_scale": 0.5**i}
            for i in range(groups)
        ],
        lr=0.2,
    )


def _run(opt: TVLARS, sched: TVLARSScheduler, steps: int) -> list[tuple[float, float]]:
    """(phi, lr of group 0) applied at each of ``steps`` steps."""
    out = []
    for _ in range(steps):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        stats = opt.last_step_stats
        out.append((float(stats.phase), stats.lr[0]))
        sched.step()
    return out


def test_lr_is_base_times_group_scale_times_batch_scale_and_honours_lr_scale() -> None:
    opt = _optimizer(groups=2)
    TVLARSScheduler(opt, total_steps=10, batch_scale=4.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.8, 0.4])


@given(t0=st.integers(1, 80), growth=st.floats(1.1, 5.0))
@settings(max_examples=60, deadline=None)
def test_a_continued_phase_passes_through_the_current_value_and_ends_decayed(
    t0: int, growth: float
) -> None:
    phase = SigmoidPhase.from_training_length(100)
    end = 100 * growth
    new = phase.continued(t0, end)
    assert new(t0) == pytest.approx(phase(t0), rel=1e-9)
    if phase(t0) > 0.011:  # not yet decayed that far: the new phase ends at 1% of the way
        assert new(end) == pytest.approx(0.01, rel=1e-6)
    assert all(new(a) >= new(b) for a, b in itertools.pairwise(range(t0, int(end))))


def test_a_phase_already_past_the_target_is_kept() -> None:
    phase = SigmoidPhase.from_training_length(100)
    assert phase.continued(99, 50) is phase and phase.continued(150, 300) is phase


def test_replanning_a_longer_run_has_no_jump_in_phi_or_cosine() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(
        opt, total_steps=20, batch_scale=2.0, phase=FittedPhase(), lr_schedule="cosine"
    )
    first = _run(opt, sched, 10)
    expected_next_lr = sched.lr_factor(10) * 0.2
    phi_next = opt.phase(10)
    sched.plan_for(total_steps=60, batch_scale=2.0)
    second = _run(opt, sched, 50)
    assert second[0][0] == pytest.approx(phi_next) and second[0][1] == pytest.approx(
        expected_next_lr
    )
    values = first + second
    assert all(b[0] <= a[0] and b[1] <= a[1] for a, b in itertools.pairwise(values))
    assert sched.plan.phase(60) == pytest.approx(0.01)
    # the cosine goes on from its value at step 10 (of the old 20-step plan) to 1e-3 at 60
    a10 = 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 10 / 20))
    a59 = 1e-3 + (a10 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 49 / 50))
    assert values[-1][1] == pytest.approx(0.2 * 2.0 * a59)
    (change,) = sched.changes
    assert change.startswith("run length 20 -> 60 optimizer steps at step 10")


def test_a_new_batch_scale_applies_from_the_current_step() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=None, batch_scale=1.0, effective_batch_size=256)
    _run(opt, sched, 3)
    sched.plan_for(None, 4.0, 1024)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8)
    assert sched.changes == ["effective batch 256 -> 1024, learning-rate scale 1 -> 4 from step 3"]


def test_state_dict_is_plain_numbers_and_a_same_run_resume_is_exact() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=30, batch_scale=2.0, phase=FittedPhase())
    _run(opt, sched, 12)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    straight = _run(opt, sched, 18)

    opt2 = _optimizer()
    sched2 = TVLARSScheduler(opt2, total_steps=30, batch_scale=2.0, phase=FittedPhase())
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.changes == []
    assert _run(opt2, sched2, 18) == straight


def test_hold_phase_freezes_and_releases_phi() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=20, phase=FittedPhase())
    _run(opt, sched, 5)
    held = opt.phase(5)
    sched.hold_phase(True)
    assert {phi for phi, _ in _run(opt, sched, 5)} == {held}
    sched.hold_phase(False)
    assert _run(opt, sched, 1)[0][0] == pytest.approx(sched.plan.phase(10))


def test_set_base_lr_rescales_every_group() -> None:
    opt = _optimizer(groups=2)
    sched = TVLARSScheduler(opt, total_steps=10, batch_scale=2.0)
    sched.set_base_lr(1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.0, 1.0])


def test_a_learning_rate_only_schedule_for_another_optimizer_uses_its_own_count() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = TVLARSScheduler(opt, total_steps=10, warmup_steps=4, lr_schedule="cosine")
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    with pytest.raises(TypeError, match="a phase needs a TVLARS optimizer"):
        TVLARSScheduler(opt, total_steps=10, phase=FittedPhase())


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="phase fitted to the run needs the run length"):
        TVLARSScheduler(_optimizer(), total_steps=None, phase=FittedPhase())
    with pytest.raises(ValueError, match="lr_schedule='cosine' needs the run length"):
        TVLARSScheduler(_optimizer(), total_steps=None, lr_schedule="cosine")
    with pytest.raises(ValueError, match="total_steps=0 is invalid"):
        TVLARSScheduler(_optimizer(), total_steps=0)
    with pytest.raises(TypeError, match=r"phase=0.5 is invalid"):
        TVLARSScheduler(_optimizer(), total_steps=5, phase=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"half_at=1.5 is invalid"):
        FittedPhase(half_at=1.5)
