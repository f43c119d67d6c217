"""The run-change policy of docs/run-changes.md (issue #22), each through a real Trainer on CPU:
a second LR scheduler, ``lr_schedule='external'``, ``max_time``, data whose length changes,
extending a finished run, re-plans at resume, manual optimization, an explicit phase in epochs
and a second fit.
"""

from __future__ import annotations

import itertools
import logging
import math
import types
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import Record, TinyRegressor, cpu_trainer, regression_data
from torch import Tensor, nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LambdaLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
)
from torch.utils.data import DataLoader

from lightning_tvlars import PhaseConfig, SigmoidPhase, TVLARSConfig, configure_tvlars
from lightning_tvlars.lightning import sync

RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


def _messages(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


# ---------------------------------------------------------------- 1. a second LR scheduler

#: The user's schedulers, 16 steps long; SequentialLR: half the rate for 4 steps, then cosine.
THEIRS: dict[str, Callable[[torch.optim.Optimizer], LRScheduler]] = {
    "CosineAnnealingLR": lambda o: CosineAnnealingLR(o, T_max=16),
    "OneCycleLR": lambda o: OneCycleLR(o, max_lr=0.5, total_steps=16),
    "LambdaLR": lambda o: LambdaLR(o, lambda t: 1 / (1 + t)),
    "SequentialLR": lambda o: SequentialLR(
        o, [ConstantLR(o, factor=0.5, total_iters=4), CosineAnnealingLR(o, T_max=12)], [4]
    ),
}


class WithTheirScheduler(TinyRegressor):
    """configure_tvlars's optimizer with a scheduler of the user's on it, returned beside
    TVLARS's (``both``) or instead of it."""

    def __init__(self, theirs: str, config: TVLARSConfig, both: bool = True) -> None:
        super().__init__(batch_size=32)
        self.theirs, self.config, self.both = theirs, config, both
        self.built: list[Any] = []

    def configure_optimizers(self) -> Any:
        tvlars = configure_tvlars(self, self.config)
        optimizer = tvlars["optimizer"]
        theirs = {"scheduler": THEIRS[self.theirs](optimizer), "interval": "step"}
        self.built = [optimizer, tvlars["lr_scheduler"]["scheduler"], theirs["scheduler"]]
        if self.both:
            return [optimizer], [tvlars["lr_scheduler"], theirs]
        return {"optimizer": optimizer, "lr_scheduler": theirs}


@pytest.mark.parametrize("both", [True, False], ids=["both-returned", "tvlars-not-returned"])
@pytest.mark.parametrize("theirs", list(THEIRS))
def test_a_second_lr_scheduler_is_refused_before_the_first_step(
    tmp_path: Path, theirs: str, both: bool
) -> None:
    model = WithTheirScheduler(theirs, TVLARSConfig(lr=1.0, base_batch_size=16), both)
    record = Record()
    with pytest.raises(
        ValueError,
        match=rf"^{theirs} and TVLARSScheduler would both set the learning rate of TVLARS.*"
        r"one owner\. Hand it to your scheduler with TVLARSConfig\(lr_schedule='external'\)",
    ):
        cpu_trainer(tmp_path, max_steps=16, callbacks=[record]).fit(model)
    assert model.built[0].step_count == 0 and record.steps == {}


@pytest.mark.parametrize("theirs", list(THEIRS))
def test_external_hands_the_rate_to_their_scheduler_and_keeps_the_phase(
    tmp_path: Path, theirs: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each step applies the user's scheduler's rate, run on the batch-scaled rate (1.0 x 32/16
    = 2.0; OneCycleLR sets its own from max_lr), and phi follows the phase fitted to 16 steps."""
    config = TVLARSConfig(lr=1.0, base_batch_size=16, lr_schedule="external")
    model, record = WithTheirScheduler(theirs, config), Record()
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        cpu_trainer(tmp_path, max_steps=16, callbacks=[record]).fit(model)
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = THEIRS[theirs](reference)
    expected = []
    for _ in range(16):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()
    assert record.lrs() == pytest.approx(expected, rel=1e-12)
    record.assert_applied_as_shown()
    if theirs in ("CosineAnnealingLR", "LambdaLR"):
        assert record.lrs()[0] == 2.0  # from the batch-scaled rate, not the base 1.0
    phase = model.built[1].plan.phase
    assert record.phases() == pytest.approx([phase(t) for t in range(16)])
    assert record.phases()[8] == pytest.approx(0.5)
    (plan,) = _messages(caplog, "TVLARS: effective batch size")
    assert "learning rate 2 = 1 x 32/16 (linear scaling)" in plan
    assert (
        "learning rate: your scheduler's (it starts from the batch-scaled rate; TVLARS keeps "
        "the phase)" in plan
    )


# ---------------------------------------------------------------- 2. max_time


class FakeClock(pl.Callback):
    """Each training batch takes ``seconds`` of a clock that Lightning's Timer and ScheduleSync
    read (installed with ``install``): a time budget without the machine's timing noise."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.now = seconds, 0.0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = types.SimpleNamespace(monotonic=lambda: self.now)
        monkeypatch.setattr("lightning.pytorch.callbacks.timer.time", clock)
        monkeypatch.setattr(sync, "time", clock)

    def on_train_batch_start(self, *args: object) -> None:
        self.now += self.seconds


def test_max_time_replans_so_that_the_phase_ends_when_the_time_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps of 1/32 s and max_time 90/32 s, with an epoch limit of 8000 steps (8 per epoch):
    the rate is measured after the 3 start-up steps, over 5 steps (5% of the budget: 4.5
    steps) at the start of the second epoch, and the plan becomes the 90 steps the time
    allows, once (the later checks agree). Powers of two: the clock's sums are exact."""
    clock = FakeClock(1 / 32)
    clock.install(monkeypatch)
    model, record = TinyRegressor(batch_size=32), Record()
    trainer = cpu_trainer(
        tmp_path, max_epochs=1000, max_time=timedelta(seconds=90 / 32), callbacks=[clock, record]
    )
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        trainer.fit(model)
    plan = model.tvlars_plan
    assert len(record.phases()) == 90 == plan.total_steps
    assert record.phases()[-1] == pytest.approx(plan.phase(89))
    assert plan.phase(89) == pytest.approx(0.011, abs=1e-3) and plan.phase(90) == pytest.approx(
        0.01
    )
    (line,) = _messages(caplog, "TVLARS: effective batch size")
    assert line.endswith(
        "Plan: 8000 steps, constant LR, phase SigmoidPhase(alpha=1, decay=0.00114878, "
        "delay=4000, floor=0). Time budget: Trainer(max_time=2.81 s); the run length is "
        "re-planned from the measured step rate, so that the schedule ends when the time runs "
        "out."
    )
    before = SigmoidPhase.from_training_length(8000)(8)  # 0.9899
    assert _messages(caplog, "TVLARS re-planned") == [
        f"TVLARS re-planned: run length 8000 -> 90 optimizer steps at step 8: phase continues "
        f"from {before:.4g} to 0.01 at the end (time budget: max_time leaves 2.56 s at 0.0312 s "
        "per step)."
    ]
    (summary,) = _messages(caplog, "TVLARS: the fit ended")
    assert summary == (
        f"TVLARS: the fit ended after step 89, phi {plan.phase(89):.4g} (planned: "
        f"{plan.phase(89):.4g} at the plan's last step, 89), learning rate 0.125."
    )


def test_max_time_follows_steps_that_slow_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps of 1/64 s for the first 64, then of 4/64 s (the machine got busy), max_time 2 s:
    64 + 16 = 80 steps. The rate averaged since the start-up lags behind the slow-down (phi
    would end at 0.079); the rate over the last fifth of the budget follows it, and phi ends
    near its planned end (0.016 at the last step of a plan that ends at 0.01)."""
    clock = FakeClock(1 / 64)
    clock.install(monkeypatch)

    class SlowDown(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            clock.seconds = 1 / 64 if trainer.global_step < 64 else 4 / 64

    model, record = TinyRegressor(batch_size=32), Record()
    trainer = cpu_trainer(
        tmp_path,
        max_epochs=1000,
        max_time=timedelta(seconds=2),
        callbacks=[SlowDown(), clock, record],
    )
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        trainer.fit(model)
    phases, plan = record.phases(), model.tvlars_plan
    assert len(phases) == 80
    assert phases[-1] == pytest.approx(plan.phase(79)) == pytest.approx(0.0159, abs=1e-4)
    lengths = [int(m.split(" -> ")[1].split()[0]) for m in _messages(caplog, "TVLARS re-planned")]
    # 2 s at 1/64 s: 128 steps; then the slower rate of the last fifth of the budget
    # (4/64 s since step 68 or so) pulls the plan in to the real 80 by step 72
    assert lengths == [128, 119, 103, 92, 84, 80] == [*lengths[:-1], plan.total_steps]


def test_max_time_on_the_real_clock_ends_the_phase_near_its_planned_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 s of real steps, however busy this shared machine is (0.01 to 0.2 s per step seen:
    20 to 400 steps; the first re-plan needs 5). With a steady rate phi ends within a step or
    two of the plan's end, about 0.01; a slow-down is followed by the rate of the last fifth
    of the budget, a speed-up only takes phi past its end, further down (0.001 to 0.012 in
    runs on this machine while it was loaded). phi <= 0.05 leaves room for a slow-down in the
    last 5% of the time, after the last check: 0.05 is where a fitted phase is at 0.82 of its
    plan, and where one continued over its last 7 steps is 3 steps before its end."""
    model, record = TinyRegressor(batch_size=32), Record()
    trainer = cpu_trainer(
        tmp_path, max_epochs=1000, max_time=timedelta(seconds=4), callbacks=[record]
    )
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        trainer.fit(model)
    steps, plan = len(record.phases()), model.tvlars_plan
    assert record.phases()[-1] <= 0.05
    assert record.phases()[-1] == pytest.approx(plan.phase(steps - 1))
    assert plan.total_steps < 8000
    (first, *_) = _messages(caplog, "TVLARS re-planned: run length 8000 -> ")
    assert "(time budget: max_time leaves " in first
    (line,) = _messages(caplog, "TVLARS: effective batch size")
    assert "Time budget: Trainer(max_time=4 s); the run length is re-planned" in line


def test_max_time_alone_is_refused_naming_max_time(tmp_path: Path) -> None:
    record = Record()
    trainer = cpu_trainer(tmp_path, max_time=timedelta(seconds=3), callbacks=[record])
    with pytest.raises(
        ValueError,
        match=r"^Trainer\(max_time=\.\.\.\) alone does not say how many optimizer steps the run "
        r"takes.*add max_epochs or max_steps.*TVLARSConfig\(total_steps=\.\.\.\).*explicit phase",
    ):
        trainer.fit(TinyRegressor())
    assert record.steps == {}


# ---------------------------------------------------------------- 3. data that changes length


class Curriculum(TinyRegressor):
    """40, 80, 120, 160 samples in epochs 0-3 (reloaded every epoch): 5 + 10 + 15 + 20 = 50
    steps of 8."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(40 * (self.current_epoch + 1)), batch_size=8)


def _fit_curriculum(
    tmp_path: Path, config: TVLARSConfig, caplog: pytest.LogCaptureFixture
) -> tuple[Curriculum, Record, list[str]]:
    model, record = Curriculum(tvlars=config), Record()
    trainer = cpu_trainer(
        tmp_path, max_epochs=4, reload_dataloaders_every_n_epochs=1, callbacks=[record]
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, RANK_ZERO):
        warnings.simplefilter("always")
        trainer.fit(model)
    return model, record, [str(w.message) for w in caught if "TVLARS" in str(w.message)]


def test_data_that_changes_length_is_warned_about_once_naming_total_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each epoch start counts the steps done and the epochs left at the current length: 20,
    then 5 + 3 x 10 = 35, 15 + 2 x 15 = 45, 30 + 20 = 50 (the real length, known in the last
    epoch)."""
    model, record, warned = _fit_curriculum(tmp_path, TVLARSConfig(), caplog)
    assert warned == [
        "TVLARS: the training data changed length between epochs (5 -> 10 batches): the plan "
        "assumes every later epoch has the current length. If it keeps changing, state the "
        "run's length in optimizer steps: TVLARSConfig(total_steps=...) "
        "(--model.tvlars.total_steps)."
    ]
    plan = model.tvlars_plan
    assert len(record.phases()) == 50 == plan.total_steps
    assert [m.split(":")[1] for m in _messages(caplog, "TVLARS re-planned")] == [
        " run length 20 -> 35 optimizer steps at step 5",
        " run length 35 -> 45 optimizer steps at step 15",
        " run length 45 -> 50 optimizer steps at step 30",
    ]
    assert record.phases()[-1] == pytest.approx(plan.phase(49)) and plan.phase(50) == (
        pytest.approx(0.01)
    )
    (summary,) = _messages(caplog, "TVLARS: the fit ended")
    assert summary.startswith(f"TVLARS: the fit ended after step 49, phi {plan.phase(49):.4g} (")


def test_total_steps_in_the_config_states_the_length_the_trainer_cannot_know(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, record, warned = _fit_curriculum(tmp_path, TVLARSConfig(total_steps=50), caplog)
    assert warned == []  # the length is stated: nothing to warn about
    phases, plan = record.phases(), model.tvlars_plan
    assert len(phases) == 50 == plan.total_steps
    assert phases[25] == pytest.approx(0.5) and plan.phase(50) == pytest.approx(0.01)
    assert _messages(caplog, "TVLARS re-planned") == []
    (summary,) = _messages(caplog, "TVLARS: the fit ended")
    assert summary == (
        f"TVLARS: the fit ended after step 49, phi {phases[49]:.4g} (planned: {phases[49]:.4g} "
        "at the plan's last step, 49), learning rate 0.03125."
    )


def test_the_summary_states_the_planned_steps_a_fit_did_not_take(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """total_steps=80 for a 50-step run: the last phi against the planned one, and the rest."""
    model, record, _ = _fit_curriculum(tmp_path, TVLARSConfig(total_steps=80), caplog)
    phase = model.tvlars_plan.phase
    (summary,) = _messages(caplog, "TVLARS: the fit ended")
    assert summary == (
        f"TVLARS: the fit ended after step 49, phi {phase(49):.4g} (planned: {phase(79):.4g} at "
        "the plan's last step, 79), learning rate 0.03125, 30 planned steps were not taken."
    )
    assert phase(49) == pytest.approx(record.phases()[-1]) and phase(49) > 0.1


# ---------------------------------------------------------------- 4. extending a finished run


def _checkpointing_trainer(
    tmp_path: Path, max_steps: int, *callbacks: pl.Callback
) -> tuple[pl.Trainer, Record]:
    """A trainer that saves ``tmp_path/ckpt/last.ckpt`` every 4 steps, and its Record."""
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    trainer = cpu_trainer(
        tmp_path,
        max_steps=max_steps,
        enable_checkpointing=True,
        callbacks=[checkpoint, record, *callbacks],
    )
    return trainer, record


def test_extending_a_finished_cosine_is_refused_naming_how_to_start_a_new_schedule(
    tmp_path: Path,
) -> None:
    """A cosine to 0 planned for 16 steps and run to its end, resumed with max_steps=32: no
    step at rate 0; a new fit from the checkpoint's weights starts a new schedule."""
    config = TVLARSConfig(lr_schedule="cosine", final_lr_ratio=0.0, base_batch_size=32)
    trainer, _ = _checkpointing_trainer(tmp_path, 16)
    trainer.fit(TinyRegressor(tvlars=config, batch_size=32))
    path = tmp_path / "ckpt" / "last.ckpt"
    again, record = _checkpointing_trainer(tmp_path / "again", 32)
    with pytest.raises(
        ValueError,
        match=r"^this run's schedule ended at step 16 \(cosine learning rate at its final value, "
        r"0 x the peak\), and the run now goes on to 32: a finished schedule cannot be "
        r"continued\. Start a new one from these weights: load the checkpoint's model weights "
        r"and fit again without ckpt_path",
    ):
        again.fit(TinyRegressor(tvlars=config, batch_size=32), ckpt_path=path)
    assert record.steps == {}
    fresh, record = TinyRegressor.load_from_checkpoint(path), Record()
    cpu_trainer(tmp_path, max_steps=16, callbacks=[record]).fit(fresh)
    assert record.lrs()[0] == 1.0 and record.lrs()[8] == pytest.approx(0.5)  # a new cosine


@pytest.mark.parametrize("stop", [16, 12])
def test_extending_a_constant_lr_run_keeps_a_sane_phase(
    tmp_path: Path, stop: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A fitted phase planned for 16 steps, run to 16 (its end) or 12, resumed with
    max_steps=32: at its end the phase goes on on its own course (never stretched into a flat
    line of decay ~1e-17); before it, it continues to 0.01 at the new end."""
    first = TinyRegressor(batch_size=32)
    trainer, before = _checkpointing_trainer(tmp_path, 16, _Interrupt(stop))
    trainer.fit(first)
    saved = first.tvlars_plan.phase
    second = TinyRegressor(batch_size=32)
    again, after = _checkpointing_trainer(tmp_path / "again", 32)
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        again.fit(second, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    phase = second.tvlars_plan.phase
    assert phase.decay > 1e-3 and abs(phase.delay) < 1e3 and phase.alpha == 1.0
    phases = before.phases() + after.phases()
    assert len(phases) == 32 and all(b < a for a, b in itertools.pairwise(phases))
    (line,) = _messages(caplog, "TVLARS re-planned")
    if stop == 16:
        assert phase == saved  # the saved phase, on its course
        assert line == (
            "TVLARS re-planned: run length 16 -> 32 optimizer steps at step 16: phase stays on "
            "its course (already 0.01, near its end)."
        )
    else:
        assert after.phases()[0] == pytest.approx(saved(12)) and phase(32) == pytest.approx(0.01)
        assert line.startswith("TVLARS re-planned: run length 16 -> 32 optimizer steps at step 12")


class _Interrupt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        trainer.should_stop = trainer.global_step == self.step


# ---------------------------------------------------------------- 5. re-plans at resume


def test_replans_made_at_resume_are_logged_once_at_the_start_of_the_resumed_fit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 steps of batch 8, resumed into 8 steps of batch 16 (mid-epoch: no epoch start)."""
    trainer, _ = _checkpointing_trainer(tmp_path, 4)
    trainer.fit(TinyRegressor(batch_size=8))
    second, record = TinyRegressor(batch_size=16), Record()
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        cpu_trainer(tmp_path, max_steps=8, callbacks=[record]).fit(
            second, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert record.lrs() == pytest.approx([0.0625] * 4)  # 1.0 x 16/256
    assert _messages(caplog, "TVLARS re-planned") == [
        "TVLARS re-planned: run length 4 -> 8 optimizer steps at step 4: phase stays on its "
        "course (already 0.01, near its end).",
        "TVLARS re-planned: effective batch 8 -> 16 from step 4: learning-rate scale 0.03125 "
        "-> 0.0625.",
    ]
    assert second.tvlars_schedulers[0].changes == []


# ---------------------------------------------------------------- 11. manual optimization, ...


class ManualRegressor(TinyRegressor):
    """Manual optimization that calls ``opt.step()`` only, never the scheduler's ``step()``."""

    def __init__(self, tvlars: TVLARSConfig) -> None:
        super().__init__(tvlars=tvlars, batch_size=32)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()  # type: ignore[union-attr]


def test_manual_optimization_without_scheduler_steps_gets_the_scheduled_rate_every_step(
    tmp_path: Path,
) -> None:
    config = TVLARSConfig(lr_schedule="cosine", base_batch_size=32)
    model, record = ManualRegressor(config), Record()
    cpu_trainer(tmp_path, max_steps=16, callbacks=[record]).fit(model)
    cosine = [1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * t / 16)) for t in range(16)]
    assert record.lrs() == pytest.approx(cosine)
    assert record.phases() == pytest.approx([model.tvlars_plan.phase(t) for t in range(16)])
    record.assert_applied_as_shown()


def test_a_negative_delay_in_epochs_is_a_negative_delay_in_steps(tmp_path: Path) -> None:
    """-1 epoch of 8 steps: delay -8, phi = 1 / (1 + exp(0.1 (t + 8)))."""
    explicit = PhaseConfig(mode="explicit", decay=0.1, delay=-1, delay_unit="epochs")
    model, record = TinyRegressor(tvlars=TVLARSConfig(phase=explicit), batch_size=32), Record()
    cpu_trainer(tmp_path, max_epochs=2, callbacks=[record]).fit(model)
    assert model.tvlars_plan.phase == SigmoidPhase(decay=0.1, delay=-8.0)
    expected = [1 / (1 + math.exp(0.1 * (t + 8))) for t in range(16)]
    assert record.phases() == pytest.approx(expected)


def test_a_second_fit_with_a_new_trainer_says_the_schedule_starts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = TinyRegressor(batch_size=32)
    note = "A new fit: the schedule starts again at step 0 (to continue a run: ckpt_path)."
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        cpu_trainer(tmp_path, max_steps=8).fit(model)
        assert [note in m for m in _messages(caplog, "TVLARS: effective")] == [False]
        record = Record()
        cpu_trainer(tmp_path, max_steps=8, callbacks=[record]).fit(model)
    assert [m.endswith(note) for m in _messages(caplog, "TVLARS: effective")] == [False, True]
    assert record.phases()[0] == pytest.approx(model.tvlars_plan.phase(0))  # from step 0 again


def test_a_lamb_run_speaks_of_lamb(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The plan and the end-of-fit summary name the optimizer the run uses."""
    model = TinyRegressor(TVLARSConfig(optimizer="lamb", lr=0.01))
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        cpu_trainer(tmp_path, max_steps=4).fit(model)
    (plan,) = _messages(caplog, "LAMB: effective batch size 16 = 16 per device")
    assert "Plan: 4 steps, constant LR, phase SigmoidPhase(" in plan
    assert len(_messages(caplog, "LAMB: the fit ended after step 3")) == 1
    assert not _messages(caplog, "TVLARS")
