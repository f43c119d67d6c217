"""Schedules that follow the real run, each scenario through a real Trainer on CPU.

The promise: set TVLARS up once and the phase and learning rate are right for the run that
really happens: streaming data, accumulation schedules, resumes into a changed run, several
optimizers, the LR finder, mixed precision with skipped steps. Each scenario runs with TVLARS
(a fitted phase) and with the warm-up forms (LARS, and LAMB where it is cheap, with a warm-up
and a cosine; ``lightning_helpers.FORMS``), and every step applies the rate its groups showed
before it.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import (
    Record,
    TinyRegressor,
    cpu_trainer,
    form,
    regression_data,
    warmup_cosine,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_tvlars import (
    PhaseConfig,
    TVLARSConfig,
    TVLARSMonitor,
    TVLARSScheduler,
    configure_tvlars,
)

_trainer = cpu_trainer
WARMUP_FORMS = ["warmup", "lamb-warmup"]


def _decreasing(values: list[float]) -> bool:
    return all(b <= a for a, b in itertools.pairwise(values))


# ---------------------------------------------------------------- 1. streaming data


class Stream(IterableDataset):
    """Regression samples without __len__ (32 per pass)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from regression_data(32)


class StreamingRegressor(TinyRegressor):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Stream(), batch_size=8)


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("tvlars", "a phase fitted to the run needs"),
        ("warmup", "warmup_fraction=0.25 and lr_schedule='cosine' need"),
    ],
)
def test_streaming_data_without_a_length_refuses_a_fitted_phase_before_training(
    tmp_path: Path, name: str, needs: str
) -> None:
    record = Record()
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[record])
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(needs)} the run length.*max_steps=.*"
        r"explicitly in steps",
    ):
        trainer.fit(StreamingRegressor(tvlars=form(name)))
    assert record.steps == {}  # refused before the first step


def test_streaming_data_with_max_steps_fits_the_phase_to_the_real_length(tmp_path: Path) -> None:
    record = Record()
    model = StreamingRegressor()
    _trainer(tmp_path, max_steps=20, callbacks=[record]).fit(model)
    phases = record.phases()
    assert len(phases) == 20 == model.tvlars_plan.total_steps
    assert phases[10] == pytest.approx(0.5) and model.tvlars_plan.phase(20) == pytest.approx(0.01)
    record.assert_applied_as_shown()


@pytest.mark.parametrize("name", WARMUP_FORMS)
def test_streaming_data_with_max_steps_warms_up_and_anneals_over_the_real_length(
    tmp_path: Path, name: str
) -> None:
    record = Record()
    model = StreamingRegressor(tvlars=form(name))
    _trainer(tmp_path, max_steps=20, callbacks=[record]).fit(model)
    scale = 8 / 256  # batch 8 at the base batch 256
    assert model.tvlars_plan.total_steps == 20 and model.tvlars_plan.warmup_steps == 5
    assert record.lrs() == pytest.approx([scale * warmup_cosine(t, 20) for t in range(20)])
    assert record.phases() == [1.0] * 20  # no phase
    record.assert_applied_as_shown()


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_an_explicit_phase_works_without_any_run_length(tmp_path: Path, optimizer: str) -> None:
    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            trainer.should_stop = trainer.global_step >= 10

    config = TVLARSConfig(
        optimizer=optimizer,  # type: ignore[arg-type]
        phase=PhaseConfig(mode="explicit", decay=0.5, delay=5),
    )
    record = Record()
    model = StreamingRegressor(tvlars=config)
    _trainer(tmp_path, max_epochs=-1, callbacks=[record, Stop()]).fit(model)
    assert model.tvlars_plan.total_steps is None
    expected = [1 / (1 + math.exp(0.5 * (t - 5.0))) for t in range(10)]
    assert record.phases()[:10] == pytest.approx(expected)
    record.assert_applied_as_shown()


# ---------------------------------------------------------------- 2. accumulation schedules


@pytest.mark.parametrize("name", ["tvlars", "warmup", "lamb-warmup"])
def test_accumulation_schedule_plans_the_optimizer_steps_that_really_happen(
    tmp_path: Path, name: str
) -> None:
    """8 batches per epoch, accumulation 1, 1, 4, 4: 8 + 8 + 2 + 2 = 20 optimizer steps."""
    config = form(name, lr_schedule="cosine", final_lr_ratio=0.01, base_batch_size=32)
    record = Record()
    model = TinyRegressor(tvlars=config, batch_size=32)  # 256 samples: 8 batches
    trainer = _trainer(
        tmp_path, max_epochs=4, callbacks=[GradientAccumulationScheduler({0: 1, 2: 4}), record]
    )
    trainer.fit(model)
    phases, lrs = record.phases(), record.lrs()
    assert len(phases) == 20 == model.tvlars_plan.total_steps == trainer.global_step
    if name == "tvlars":
        assert phases[10] == pytest.approx(0.5)  # halfway at the real half
        assert model.tvlars_plan.phase(20) == pytest.approx(0.01)  # decayed at the real end
    else:
        assert phases == [1.0] * 20 and model.tvlars_plan.warmup_steps == 5
    # the LR: (warm-up and) cosine to 1% on the real count, times the batch scale (x4 when
    # accumulating 4)
    scale = [1.0] * 16 + [4.0] * 4
    base = [lr / k for lr, k in zip(lrs, scale, strict=True)]
    if name == "tvlars":
        assert base[0] == pytest.approx(1.0) and _decreasing(base)
        assert base[-1] == pytest.approx(
            0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(19 / 20 * torch.pi)).item())
        )
    else:
        assert base == pytest.approx([warmup_cosine(t, 20, final=0.01) for t in range(20)])
    record.assert_applied_as_shown()


# ---------------------------------------------------------------- 3./4. resume, changed run


def _checkpointed_fit(
    tmp_path: Path,
    model: pl.LightningModule,
    extra: list[pl.Callback] = (),
    every: int = 4,
    **kwargs: Any,  # type: ignore[assignment]
) -> Path:
    """Fit with a checkpoint every ``every`` steps; the path of the last one."""
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=every
    )
    callbacks = [checkpoint, *extra]
    _trainer(tmp_path, enable_checkpointing=True, callbacks=callbacks, **kwargs).fit(model)
    return tmp_path / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("name", ["tvlars", "warmup", "lamb-warmup"])
def test_resume_of_the_same_run_continues_bit_for_bit(tmp_path: Path, name: str) -> None:
    """Stopped at 2 (inside the warm-up forms' 4-step warm-up) and at 8."""
    torch.manual_seed(0)
    straight = TinyRegressor(tvlars=form(name), batch_size=32)
    record = Record()
    _trainer(tmp_path / "a", max_steps=16, callbacks=[record]).fit(straight)

    for stop in (2, 8):
        torch.manual_seed(0)
        first = TinyRegressor(tvlars=form(name), batch_size=32)
        folder = tmp_path / f"b{stop}"
        path = _checkpointed_fit(folder, first, extra=[Interrupt(stop)], every=2, max_steps=16)
        resumed = TinyRegressor(tvlars=form(name), batch_size=32)
        again = Record()
        _trainer(folder, max_steps=16, callbacks=[again]).fit(resumed, ckpt_path=path)
        assert again.phases() == record.phases()[stop:]
        assert again.lrs() == record.lrs()[stop:]
        again.assert_applied_as_shown()
    record.assert_applied_as_shown()


class Interrupt(pl.Callback):
    """Stops the run at ``step``, as a preempted job would be (a checkpoint exists there)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        trainer.should_stop = trainer.global_step == self.step


def test_resume_into_a_longer_run_continues_the_phase_and_cosine_without_a_jump(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Planned for 16 steps, stopped at 8, resumed with max_steps=32."""
    config = TVLARSConfig(lr_schedule="cosine", base_batch_size=32)
    first, record = TinyRegressor(tvlars=config, batch_size=32), Record()
    path = _checkpointed_fit(tmp_path, first, extra=[record, Interrupt(8)], max_steps=16)
    old_plan = first.tvlars_plan

    second, record2 = TinyRegressor(tvlars=config, batch_size=32), Record()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, max_steps=32, callbacks=[record2]).fit(second, ckpt_path=path)
    phases = record.phases() + record2.phases()
    lrs = record.lrs() + record2.lrs()
    assert len(phases) == 32
    # no jump: the first resumed step has the phase the old plan had there, and the LR moves
    # on smoothly (one cosine step of a 32-step run, not a fresh start or a cut to the floor)
    assert record2.phases()[0] == pytest.approx(old_plan.phase(8))
    assert _decreasing(phases) and _decreasing(lrs)
    cosine_at_8 = 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 8 / 16))
    assert lrs[8] == pytest.approx(cosine_at_8)  # the old plan's own value at step 8
    plan = second.tvlars_plan
    assert plan.total_steps == 32 and plan.phase(32) == pytest.approx(0.01)
    assert phases[20] > 0.05 and lrs[24] > 10 * lrs[-1] > 0  # still decaying past the old end
    assert any(
        "re-planned: run length 16 -> 32 optimizer steps at step 8" in r.message
        for r in caplog.records
    )


@pytest.mark.parametrize("name", WARMUP_FORMS)
@pytest.mark.parametrize("stop", [2, 6])
def test_resume_into_a_longer_run_continues_the_warmup_and_cosine_without_a_jump(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, stop: int
) -> None:
    """Planned for 16 steps (warm-up 4), stopped inside the warm-up (2) or after it (6),
    resumed with max_steps=32 (warm-up 8 for a new run): a warm-up in progress rises from
    where it is to the peak at step 8; one that has ended does not start again, the cosine
    goes on from its current value to the new end."""
    config = form(name, base_batch_size=32)
    first, record = TinyRegressor(tvlars=config, batch_size=32), Record()
    path = _checkpointed_fit(
        tmp_path, first, extra=[record, Interrupt(stop)], every=2, max_steps=16
    )
    second, record2 = TinyRegressor(tvlars=config, batch_size=32), Record()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, max_steps=32, callbacks=[record2]).fit(second, ckpt_path=path)
    lrs = record.lrs() + record2.lrs()
    final, value = 1e-3, warmup_cosine(stop, 16)

    def resumed(t: int) -> float:
        if stop == 2 and t < 8:  # the warm-up in progress: from 0.6 at step 2 to 1 at 8
            return value + (1 - value) * (t - 2) / (8 - 2)
        start, top = (8, 1.0) if stop == 2 else (stop, value)
        return final + (top - final) * 0.5 * (1 + math.cos(math.pi * (t - start) / (32 - start)))

    expected = [warmup_cosine(t, 16) for t in range(stop)] + [resumed(t) for t in range(stop, 32)]
    assert lrs == pytest.approx(expected)
    peak = lrs.index(max(lrs))
    assert _decreasing(lrs[peak:]) and peak == (8 if stop == 2 else 4)
    plan = second.tvlars_plan
    assert plan.total_steps == 32 and plan.warmup_steps == (8 if stop == 2 else 4)
    warmup = ", warm-up continues to step 8" if stop == 2 else ""
    optimizer = "LAMB" if name.startswith("lamb") else "TVLARS"  # the run names its optimizer
    line = (
        f"{optimizer} re-planned: run length 16 -> 32 optimizer steps at step {stop}: no phase"
        f"{warmup}, cosine continues to the new end."
    )
    assert [r.message for r in caplog.records].count(line) == 1
    record2.assert_applied_as_shown()


@pytest.mark.parametrize("name", ["tvlars", "warmup", "lamb-warmup"])
@pytest.mark.parametrize("change", ["batch", "accumulation"])
def test_resume_with_another_batch_applies_and_logs_the_new_scale(
    tmp_path: Path, change: str, name: str
) -> None:
    """TVLARS (constant LR): a finished 4-step run extended to 8; the warm-up forms (a cosine
    cannot be extended once it has ended): an 8-step run stopped at 4, resumed with another
    batch."""
    config = form(name, lr=1.0, base_batch_size=16)
    first = TinyRegressor(tvlars=config, batch_size=16)
    if name == "tvlars":
        path = _checkpointed_fit(tmp_path, first, max_steps=4)
    else:
        path = _checkpointed_fit(tmp_path, first, extra=[Interrupt(4)], max_steps=8)
    batch, accumulate = (32, 1) if change == "batch" else (16, 2)
    logger = CSVLogger(tmp_path / "logs")
    record = Record()
    second = TinyRegressor(tvlars=config, batch_size=batch)
    _trainer(
        tmp_path,
        max_steps=8,
        logger=logger,
        log_every_n_steps=1,
        accumulate_grad_batches=accumulate,
        callbacks=[record, TVLARSMonitor(per_layer=False)],
    ).fit(second, ckpt_path=path)
    # 1.0 x 32/16, not the restored 1.0 (the warm-up forms: times their cosine at steps 4-7)
    factors = [1.0] * 4 if name == "tvlars" else [warmup_cosine(t, 8) for t in range(4, 8)]
    expected = [2.0 * f for f in factors]
    assert record.lrs() == pytest.approx(expected)
    assert second.tvlars_plan.effective_batch_size == 32
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = [float(r["tvlars/lr"]) for r in csv.DictReader(f) if r.get("tvlars/lr")]
    assert logged == pytest.approx(expected)
    record.assert_applied_as_shown()


# ---------------------------------------------------------------- 5. several optimizers


class TwoOptimizers(pl.LightningModule):
    """A GAN-shaped module: two networks, one TVLARS each, manual optimization."""

    def __init__(self, config: TVLARSConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        self.critic = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        g_opt, c_opt = self.optimizers()  # type: ignore[misc]
        fake = self.generator(x)
        critic_loss = self.critic(fake.detach()).mean() - self.critic(y).mean()
        c_opt.zero_grad()
        self.manual_backward(critic_loss)
        c_opt.step()
        generator_loss = -self.critic(fake).mean()
        g_opt.zero_grad()
        self.manual_backward(generator_loss)
        g_opt.step()
        for sched in self.lr_schedulers():  # type: ignore[union-attr]
            sched.step()

    def configure_optimizers(self) -> Any:
        return [
            configure_tvlars(self, self.config, parameters=self.generator),
            configure_tvlars(self, self.config, parameters=self.critic),
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(64), batch_size=8)


@pytest.mark.parametrize("name", ["tvlars", "warmup", "lamb-warmup"])
def test_each_optimizer_plans_its_own_steps(tmp_path: Path, name: str) -> None:
    model, record = TwoOptimizers(form(name)), Record()
    trainer = _trainer(tmp_path, max_steps=40, callbacks=[record])  # Lightning counts both
    trainer.fit(model)
    g_opt, c_opt = trainer.optimizers
    # each network in its own optimizer only (the critic is not trained by the generator loss)
    assert {id(p) for g in g_opt.param_groups for p in g["params"]} == {
        id(p) for p in model.generator.parameters()
    }
    assert {id(p) for g in c_opt.param_groups for p in g["params"]} == {
        id(p) for p in model.critic.parameters()
    }
    for index in (0, 1):
        assert len(record.phases(index)) == 20
        (scheduler,) = [
            c.scheduler
            for c in trainer.lr_scheduler_configs
            if c.scheduler.optimizer is trainer.optimizers[index]
        ]
        assert isinstance(scheduler, TVLARSScheduler) and scheduler.plan.total_steps == 20
        if name == "tvlars":
            assert record.phases(index)[10] == pytest.approx(0.5)
            assert scheduler.plan.phase(20) == pytest.approx(0.01)
        else:  # batch 8 at the base batch 256, warmed up over 5 of each one's 20 steps
            expected = [8 / 256 * warmup_cosine(t, 20) for t in range(20)]
            assert record.lrs(index) == pytest.approx(expected)
        record.assert_applied_as_shown(index)


# ---------------------------------------------------------------- 6. the LR finder


@pytest.mark.parametrize("name", ["tvlars", "warmup"])
def test_lr_find_holds_the_phase_and_writes_base_lr_units_into_the_config(
    tmp_path: Path, name: str
) -> None:
    from lightning.pytorch.tuner import Tuner

    model = TinyRegressor(tvlars=form(name, lr=1.0, base_batch_size=16), batch_size=64)
    phases: list[float] = []
    applied: list[float] = []

    def spy(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        stats = opt.last_step_stats  # type: ignore[attr-defined]
        phases.append(float(stats.phase))
        applied.append(stats.lr[0])

    trainer = _trainer(tmp_path, max_epochs=10)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(spy)
    try:
        result = Tuner(trainer).lr_find(
            model, min_lr=1e-3, max_lr=10.0, num_training=20, early_stop_threshold=None
        )
    finally:
        hook.remove()
    assert result is not None and len(result.results["lr"]) == 20
    suggestion = result.suggestion()
    assert suggestion is not None
    # written back before batch scaling: the run applies suggestion at batch 64 = base x 4
    assert model.tvlars_config.lr == pytest.approx(suggestion / 4)
    assert len(phases) == 20 and len(set(phases)) == 1  # held during the sweep
    # the sweep's own rates, as the finder set them: no warm-up or annealing on top
    assert applied == pytest.approx(result.results["lr"])


# ---------------------------------------------------------------- 7. mixed precision


@pytest.mark.parametrize("name", ["tvlars", "warmup", "lamb-warmup"])
def test_fp16_skipped_steps_keep_t_equal_to_global_step(tmp_path: Path, name: str) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Spiky(TinyRegressor):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 2 else loss  # one overflowing step

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, record = Spiky(tvlars=form(name), batch_size=32), Record()
    trainer = _trainer(
        tmp_path,
        max_steps=6,
        callbacks=[record],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert opt.step_count == trainer.global_step == 6
    assert scaler.get_scale() < 2.0**8  # the overflow was seen and the scale reduced
    assert [t for t, _, _ in record.steps[0]] == list(range(6))
    if name != "tvlars":  # the skipped step counts: the warm-up and cosine follow t
        assert record.lrs() == pytest.approx([32 / 256 * warmup_cosine(t, 6) for t in range(6)])
    record.assert_applied_as_shown()
