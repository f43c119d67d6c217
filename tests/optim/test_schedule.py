"""TVLARSScheduler without Lightning: the one owner of the learning rate and the phase."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, OneCycleLR

from lightning_tvlars import LAMB, TVLARS, FittedPhase, SigmoidPhase, TVLARSScheduler
from lightning_tvlars.schedule import batch_factor

pytestmark = pytest.mark.optim


def _optimizer(groups: int = 1, cls: type = TVLARS) -> torch.optim.Optimizer:
    return cls(
        [
            {"params": [torch.nn.Parameter(torch.ones(3))], "lr_scale": 0.5**i}
            for i in range(groups)
        ],
        lr=0.2,
    )


def _run(opt: torch.optim.Optimizer, sched: TVLARSScheduler | None, steps: int) -> list:
    """(phi, lr of group 0) that each of ``steps`` steps applied."""
    out = []
    for _ in range(steps):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        stats = opt.last_step_stats
        out.append((float(stats.phase), stats.lr[0]))
        if sched is not None:
            sched.step()
    return out


# ---------------------------------------------------------------- the learning rate


@pytest.mark.parametrize(("rule", "factor"), [("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)])
def test_lr_is_base_times_group_scale_times_the_batch_factor(rule: str, factor: float) -> None:
    opt = _optimizer(groups=2)
    sched = TVLARSScheduler(opt, total_steps=10, effective_batch_size=1024, lr_scaling=rule)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * factor, 0.1 * factor])
    assert sched.batch_scale == factor == batch_factor(rule, 1024, 256)
    assert sched.applied_lr() == pytest.approx(0.2 * factor)
    assert sched.base_lr_for(0.8) == pytest.approx(0.8 / factor)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "polynomial"])
def test_warmup_then_annealing_follow_their_formulas(schedule: str) -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(
        opt,
        total_steps=20,
        warmup_fraction=0.25,
        lr_schedule=schedule,
        final_lr_ratio=0.01,
        lr_power=3.0,
    )
    lrs = [lr for _, lr in _run(opt, sched, 20)]
    assert lrs[:5] == pytest.approx([0.2 * (t + 1) / 6 for t in range(5)])
    for t in range(5, 20):
        p = (t - 5) / 15
        expected = {
            "constant": 1.0,
            "cosine": 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p)),
            "polynomial": 0.01 + 0.99 * (1 - p) ** 3,
        }[schedule]
        assert lrs[t] == pytest.approx(0.2 * expected), t


def test_the_mlperf_recipe_decays_as_the_reference() -> None:
    """MLPerf's LARS: (lr - end) * (1 - p)^2 + end after the warm-up, end = 1e-4 at lr 10."""
    from lightning_tvlars.recipe import RunFacts, build, mlperf_lars

    opt, sched = build(torch.nn.Linear(4, 4), mlperf_lars(), RunFacts(800, 4096))
    assert sched.plan.warmup_steps == 100
    for t in (100, 250, 450, 799):
        p = (t - 100) / 700
        assert sched.applied_lr(t) == pytest.approx((10.0 - 1e-4) * (1 - p) ** 2 + 1e-4)
    assert opt.phase is None and sched.applied_lr(99) == pytest.approx(10.0 * 100 / 101)


def test_the_rate_of_a_step_is_applied_without_calling_step() -> None:
    """The scheduler writes the rate before every optimizer step (a step-pre hook): a loop
    that never calls ``sched.step()`` (manual optimization) still gets the rate of its t."""
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=10, lr_schedule="cosine", final_lr_ratio=0.0)
    lrs = [lr for _, lr in _run(opt, None, 10)]
    assert lrs == pytest.approx([sched.applied_lr(t) for t in range(10)])
    assert len(set(lrs)) == 10


# ---------------------------------------------------------------- one owner


@pytest.mark.parametrize(
    "theirs",
    [
        lambda o: CosineAnnealingLR(o, T_max=10),
        lambda o: OneCycleLR(o, max_lr=0.5, total_steps=10),
        lambda o: LambdaLR(o, lambda e: 0.9**e),
    ],
    ids=["CosineAnnealingLR", "OneCycleLR", "LambdaLR"],
)
def test_a_second_lr_scheduler_is_refused_at_the_next_step(theirs) -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=10, phase=FittedPhase())
    other = theirs(opt)
    with pytest.raises(ValueError, match=r"something else wrote it.*lr_schedule='external'"):
        for _ in range(3):
            _run(opt, sched, 1)
            other.step()


def test_external_hands_the_rate_to_your_scheduler_from_the_batch_scaled_start() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(
        opt,
        total_steps=10,
        effective_batch_size=1024,
        lr_scaling="linear",
        phase=FittedPhase(),
        lr_schedule="external",
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8)  # 0.2 x 1024/256, written once
    cosine = CosineAnnealingLR(opt, T_max=10)
    applied = []
    for _ in range(10):
        expected = opt.param_groups[0]["lr"]
        phi, lr = _run(opt, sched, 1)[0]
        applied.append((phi, lr, expected))
        cosine.step()
    assert [lr for _, lr, _ in applied] == [e for _, _, e in applied]  # yours, as you set it
    assert [lr for _, lr, _ in applied] == pytest.approx(
        [0.4 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    )
    assert [phi for phi, _, _ in applied] == pytest.approx([opt.phase(t) for t in range(10)])
    assert "your scheduler" in sched.describe()
    with pytest.raises(ValueError, match=r"warmup_fraction=0\.1 has no effect with lr_schedule"):
        TVLARSScheduler(_optimizer(), total_steps=10, warmup_fraction=0.1, lr_schedule="external")


def test_a_phase_given_twice_is_refused() -> None:
    phase = SigmoidPhase(decay=0.1, delay=5)
    opt = TVLARS([torch.nn.Parameter(torch.ones(2))], lr=0.1, phase=phase)
    with pytest.raises(ValueError, match=r"already holds phase SigmoidPhase.*would replace it"):
        TVLARSScheduler(opt, total_steps=10)
    with pytest.raises(ValueError, match="already holds phase"):
        TVLARSScheduler(opt, total_steps=10, phase=FittedPhase())
    TVLARSScheduler(opt, total_steps=10, phase=phase)  # the same one: fine
    assert opt.phase == phase


def test_pause_holds_phi_and_leaves_the_rates_to_whoever_sweeps() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=20, phase=FittedPhase())
    _run(opt, sched, 5)
    held = opt.phase(5)
    sweeping = {"on": True}
    sched.pause_while(lambda: sweeping["on"])
    for lr in (0.01, 0.1, 1.0):
        opt.param_groups[0]["lr"] = lr  # the sweep's rate
        phi, applied = _run(opt, None, 1)[0]
        assert (phi, applied) == (held, lr)
    sweeping["on"] = False
    sched.set_base_lr(0.3)
    phi, applied = _run(opt, sched, 1)[0]
    assert phi == pytest.approx(sched.plan.phase(8)) and applied == pytest.approx(0.3)


# ---------------------------------------------------------------- when the run changes


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
    assert new is phase or (new.decay > 1e-9 and abs(new.delay) < 1e9)  # never degenerate


def test_a_phase_at_or_past_its_end_is_kept() -> None:
    phase = SigmoidPhase.from_training_length(100)
    assert phase.continued(99, 50) is phase and phase.continued(150, 300) is phase
    assert phase.continued(100, 200) is phase  # at its planned end: not stretched to a flat line


@pytest.mark.parametrize("schedule", ["cosine", "polynomial"])
def test_a_longer_run_continues_the_phase_warmup_and_annealing_without_a_jump(
    schedule: str,
) -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(
        opt,
        total_steps=20,
        effective_batch_size=512,
        lr_scaling="linear",
        phase=FittedPhase(),
        warmup_fraction=0.5,
        lr_schedule=schedule,
    )
    first = _run(opt, sched, 6)  # inside the 10-step warm-up
    sched.plan_for(total_steps=60, effective_batch_size=512)
    second = _run(opt, sched, 54)
    lrs = [lr for _, lr in first + second]
    phis = [phi for phi, _ in first + second]
    assert sched.plan.warmup_steps == 30
    # no jump anywhere: no change larger than one step of the first warm-up
    assert max(abs(b - a) for a, b in itertools.pairwise(lrs)) <= lrs[1] - lrs[0] + 1e-12
    assert lrs.index(max(lrs)) in (29, 30)  # the warm-up now ends at 30
    assert all(b <= a for a, b in itertools.pairwise(phis))
    assert sched.plan.phase(60) == pytest.approx(0.01)
    (change,) = sched.changes
    assert change.startswith("run length 20 -> 60 optimizer steps at step 6")
    assert "warm-up continues to step 30" in change and f"{schedule} continues" in change


def test_a_shorter_run_after_the_warmup_continues_the_cosine_to_the_new_end() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=40, lr_schedule="cosine", final_lr_ratio=0.0)
    _run(opt, sched, 10)
    value = sched.lr_factor(10)
    sched.plan_for(total_steps=20)
    lrs = [lr for _, lr in _run(opt, sched, 10)]
    assert lrs[0] == pytest.approx(0.2 * value)
    assert lrs[-1] == pytest.approx(0.2 * value * 0.5 * (1 + math.cos(math.pi * 9 / 10)))


@pytest.mark.parametrize("schedule", ["cosine", "polynomial"])
def test_extending_a_finished_annealing_is_refused_saying_how_to_continue(schedule: str) -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=15, lr_schedule=schedule, final_lr_ratio=0.0)
    _run(opt, sched, 15)
    with pytest.raises(ValueError, match=r"schedule ended at step 15.*fit again without ckpt_path"):
        sched.plan_for(total_steps=30)


def test_extending_a_finished_constant_run_keeps_the_decayed_phase() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=15, phase=FittedPhase())
    _run(opt, sched, 15)
    before = sched.plan.phase
    sched.plan_for(total_steps=30)
    assert sched.plan.phase is before and "near its end" in sched.changes[0]
    phis = [phi for phi, _ in _run(opt, sched, 15)]
    assert all(0 < phi <= before(15) for phi in phis)


def test_a_new_batch_applies_from_the_current_step() -> None:
    opt = _optimizer()
    sched = TVLARSScheduler(opt, total_steps=None, effective_batch_size=256, lr_scaling="linear")
    _run(opt, sched, 3)
    sched.plan_for(None, 1024)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8)
    assert sched.changes == ["effective batch 256 -> 1024 from step 3: learning-rate scale 1 -> 4"]


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("cls", [TVLARS, LAMB])
def test_state_dict_is_plain_numbers_and_a_same_run_resume_is_exact(cls: type) -> None:
    def build() -> tuple:
        opt = _optimizer(cls=cls)
        sched = TVLARSScheduler(
            opt,
            total_steps=30,
            effective_batch_size=512,
            lr_scaling="linear",
            phase=FittedPhase(),
            warmup_fraction=0.2,
            lr_schedule="polynomial",
        )
        return opt, sched

    opt, sched = build()
    _run(opt, sched, 12)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    straight = _run(opt, sched, 18)
    opt2, sched2 = build()
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.changes == []
    assert _run(opt2, sched2, 18) == straight


def test_a_learning_rate_only_schedule_for_another_optimizer_uses_its_own_count() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = TVLARSScheduler(opt, total_steps=10, warmup_fraction=0.4, lr_schedule="cosine")
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    with pytest.raises(TypeError, match="a phase needs TVLARS or LAMB, got SGD"):
        TVLARSScheduler(opt, total_steps=10, phase=FittedPhase())


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"a phase fitted to the run needs the run length.*total"):
        TVLARSScheduler(_optimizer(), total_steps=None, phase=FittedPhase())
    with pytest.raises(ValueError, match="lr_schedule='cosine' needs the run length"):
        TVLARSScheduler(_optimizer(), total_steps=None, lr_schedule="cosine")
    with pytest.raises(ValueError, match=r"warmup_fraction=0\.1 needs the run length"):
        TVLARSScheduler(_optimizer(), total_steps=None, warmup_fraction=0.1)
    with pytest.raises(ValueError, match="total_steps=0 is invalid"):
        TVLARSScheduler(_optimizer(), total_steps=0)
    with pytest.raises(TypeError, match=r"phase=0.5 is invalid"):
        TVLARSScheduler(_optimizer(), total_steps=5, phase=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"half_at=1.5 is invalid"):
        FittedPhase(half_at=1.5)
    with pytest.raises(ValueError, match="lr_scaling='cube' is invalid"):
        TVLARSScheduler(_optimizer(), total_steps=5, lr_scaling="cube")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"call step\(\)"):
        TVLARSScheduler(_optimizer(), total_steps=5).step(3)
