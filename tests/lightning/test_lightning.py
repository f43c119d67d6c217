"""Lightning integration on one process: helper, mixin, scaling, schedule, monitor, strategies."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_helpers import EQUIVALENCE_TOLERANCE, Record, TinyRegressor, cpu_trainer

from lightning_tvlars import (
    TVLARS,
    PhaseConfig,
    TVLARSConfig,
    TVLARSMonitor,
    TVLARSScheduler,
    configure_tvlars,
)
from lightning_tvlars.recipe import check_strategy


def _trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    """:func:`cpu_trainer` for one epoch unless told otherwise."""
    return cpu_trainer(tmp_path, **{"max_epochs": 1, **kwargs})


def _metrics(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- configure_tvlars / mixin


def test_mixin_builds_tvlars_with_groups_scaled_lr_and_step_scheduler(tmp_path: Path) -> None:
    cfg = TVLARSConfig(
        lr=0.5,
        lr_scaling="linear",
        base_batch_size=16,
        phase=PhaseConfig(mode="explicit", decay=0.1, delay=2, delay_unit="epochs"),
    )
    model = TinyRegressor(tvlars=cfg, batch_size=16)
    trainer = _trainer(tmp_path, accumulate_grad_batches=2, limit_train_batches=10, max_epochs=3)
    trainer.fit(model)
    (opt,) = trainer.optimizers
    assert isinstance(opt, TVLARS)
    assert [g["param_names"] for g in opt.param_groups] == [
        ["net.0.weight", "net.3.weight"],
        ["net.0.bias", "net.1.weight", "net.1.bias", "net.3.bias"],
    ]
    plan = model.tvlars_plan
    assert plan.effective_batch_size == 32 and plan.batch_scale == pytest.approx(2.0)  # 32/16
    assert plan.total_steps == 15 and opt.step_count == 15  # 3 epochs x 10 batches / 2
    assert plan.phase.delay == 10  # 2 epochs x 5 steps
    assert all(g["lr"] == pytest.approx(1.0) for g in opt.param_groups)  # 0.5 x 32/16
    (sched,) = trainer.lr_scheduler_configs
    assert isinstance(sched.scheduler, TVLARSScheduler) and sched.interval == "step"


def test_phase_fitted_to_the_run_by_default(tmp_path: Path) -> None:
    model = TinyRegressor(batch_size=32)  # 256 samples: 8 steps per epoch
    trainer = _trainer(tmp_path, max_epochs=5)
    trainer.fit(model)
    phase = model.tvlars_plan.phase
    assert model.tvlars_plan.total_steps == 40
    assert phase(20) == pytest.approx(0.5) and phase(40) == pytest.approx(0.01)
    assert trainer.optimizers[0].last_step_stats.phase == pytest.approx(phase(39))


def test_gradient_accumulation_schedule_rescales_lr(tmp_path: Path) -> None:
    config = TVLARSConfig(lr=1.0, base_batch_size=16, phase=PhaseConfig(mode="off"))
    model = TinyRegressor(tvlars=config, batch_size=16)
    lrs: list[tuple[int, float]] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            lrs.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))

    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        limit_train_batches=4,
        callbacks=[GradientAccumulationScheduler({1: 2}), Record()],
    )
    trainer.fit(model)
    assert {e: lr for e, lr in lrs} == {0: pytest.approx(1.0), 1: pytest.approx(2.0)}
    assert model.tvlars_plan.effective_batch_size == 32


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_the_family_with_a_warmup_and_cosine_through_a_trainer(
    tmp_path: Path, optimizer: str
) -> None:
    """The configurations the benchmark recommends, asked for through the config: the groups,
    the warm-up and the cosine; the rate each step applies is the rate the groups show."""
    config = TVLARSConfig(
        optimizer=optimizer,  # type: ignore[arg-type]
        lr=0.2,
        base_batch_size=32,
        phase=PhaseConfig(mode="off"),
        warmup_fraction=1 / 3,
        lr_schedule="cosine",
    )
    model = TinyRegressor(batch_size=32)
    model.configure_optimizers = lambda: configure_tvlars(model, config)  # type: ignore[method-assign]
    shown: list[float] = []
    applied: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            shown.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            applied.append(trainer.optimizers[0].last_step_stats.lr[0])

    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[Record()])
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == {"lars": "TVLARS", "lamb": "LAMB"}[optimizer]
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert opt.phase is None
    warmup = 8  # a third of 3 epochs x 8 steps
    assert applied == shown
    assert applied[0] == pytest.approx(0.2 / (warmup + 1))
    assert max(applied) == pytest.approx(0.2, rel=1e-6) and applied.index(max(applied)) == warmup
    assert applied[-1] < 0.05


def _warmup_cosine(optimizer: str, **options: bool) -> TVLARSConfig:
    """A warm-up and cosine annealing with the fitted phase, for the tensor-rate paths' tests."""
    return TVLARSConfig(
        optimizer=optimizer,  # type: ignore[arg-type]
        lr=0.2,
        base_batch_size=32,
        warmup_fraction=0.25,
        lr_schedule="cosine",
        **options,
    )


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_compiled_compiles_the_update_once_under_a_trainer(tmp_path: Path, optimizer: str) -> None:
    """``TVLARSConfig(compiled=True)`` through a real Trainer (warm-up, cosine, a fitted phase):
    Lightning's closure (forward and backward) runs eagerly inside ``step``, the update is
    compiled once for the whole fit (an error on any recompilation), and the weights and the
    applied rates are those of the eager capturable step."""
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        tvlars = _warmup_cosine(optimizer, capturable=True, compiled=compiled)
        model = TinyRegressor(tvlars, batch_size=32, deterministic_sampler=True)
        record = Record()
        trainer = _trainer(tmp_path, max_epochs=2, callbacks=[record])
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            trainer.fit(model)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        runs[compiled] = (model, record, trainer.optimizers[0], graphs)
    eager, eager_record, eager_opt, eager_graphs = runs[False]
    held, record, opt, graphs = runs[True]
    assert opt.compiled and not eager_opt.compiled
    assert (eager_graphs, graphs) == (0, 1)
    assert opt.step_count == 16
    assert [float(lr) for lr in record.lrs()] == [float(lr) for lr in eager_record.lrs()]
    for a, b in zip(eager.parameters(), held.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_capturable_applies_the_scheduled_rate_and_phase_as_the_float_path(
    tmp_path: Path, optimizer: str
) -> None:
    """``TVLARSConfig(capturable=True)`` through a real Trainer (float64, a warm-up, cosine and
    a phase fitted to the run): t, the rate and phi on the device, the rate tensors filled in
    place by the scheduler Lightning steps; every step applies exactly the scheduled rate and
    phi, the weights and the monitor's metrics are those of the float path."""
    runs = {}
    for capturable in (False, True):
        torch.manual_seed(0)
        tvlars = _warmup_cosine(optimizer, capturable=capturable)
        model = TinyRegressor(tvlars, batch_size=32, deterministic_sampler=True, double=True)
        record, logger = Record(), CSVLogger(tmp_path, name=str(capturable))
        monitor = TVLARSMonitor(per_layer=False)
        trainer = _trainer(
            tmp_path, max_epochs=2, callbacks=[record, monitor], logger=logger, log_every_n_steps=2
        )
        trainer.fit(model)
        rows = [r for r in _metrics(logger.log_dir) if r.get("tvlars/phase")]
        runs[capturable] = (model, record, trainer.optimizers[0], rows)
    plain, plain_record, plain_opt, plain_logged = runs[False]
    held, record, opt, logged = runs[True]
    assert opt.capturable and not plain_opt.capturable
    rates = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(r, torch.Tensor) and r.dtype == torch.float64 for r in rates)
    assert isinstance(opt.param_groups[0]["step"], torch.Tensor) and opt.step_count == 16
    scheduler = held.tvlars_schedulers[0]
    phase = held.tvlars_plan.phase
    steps = [int(t) for t, _, _ in record.steps[0]]
    assert steps == list(range(16))
    assert [float(lr) for lr in record.lrs()] == plain_record.lrs()
    assert [float(lr) for lr in record.lrs()] == [scheduler.applied_lr(t) for t in steps]
    assert record.phases() == pytest.approx([phase(t) for t in steps], rel=1e-14)
    assert record.phases() == pytest.approx(plain_record.phases(), rel=1e-14)
    for a, b in zip(plain.parameters(), held.parameters(), strict=True):
        torch.testing.assert_close(a, b, **EQUIVALENCE_TOLERANCE)
    assert (
        [r["step"] for r in logged]
        == [r["step"] for r in plain_logged]
        == [str(t) for t in range(1, 16, 2)]
    )
    for row, plain_row in zip(logged, plain_logged, strict=True):
        for key in ("tvlars/lr", "tvlars/phase", "tvlars/trust_ratio_max"):
            assert float(row[key]) == pytest.approx(float(plain_row[key]), rel=1e-9), key


def test_resume_restores_step_count_and_phase(tmp_path: Path) -> None:
    cfg = TVLARSConfig(phase=PhaseConfig(mode="explicit", decay=0.05, delay=10))
    first = TinyRegressor(tvlars=cfg)
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    trainer.fit(first)
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))
    resumed = TinyRegressor.load_from_checkpoint(ckpt)
    assert resumed.hparams["tvlars"] == cfg
    trainer2 = _trainer(tmp_path, max_epochs=2)
    trainer2.fit(resumed, ckpt_path=ckpt)  # torch.load(weights_only=True) under the hood
    assert trainer2.optimizers[0].step_count == 32


# ---------------------------------------------------------------- monitor


def test_monitor_logs_phase_lr_batch_and_per_layer_metrics(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    explicit = PhaseConfig(mode="explicit", decay=0.1, delay=5)
    model = TinyRegressor(tvlars=TVLARSConfig(phase=explicit), batch_size=32)
    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        logger=logger,
        log_every_n_steps=4,
        callbacks=[TVLARSMonitor(name_filter=r"net\.0")],
    )
    trainer.fit(model)
    logged = _metrics(logger.log_dir)
    rows = [r for r in logged if r.get("tvlars/phase")]
    # Lightning's own logging steps and step numbers: those of train/loss (optimizer step t is
    # logged at step t, when (t + 1) % 4 == 0)
    assert [int(r["step"]) for r in rows] == [3, 7, 11, 15]
    assert [int(r["step"]) for r in logged if r.get("train/loss")] == [3, 7, 11, 15]
    phase = model.tvlars_plan.phase
    for row in rows:
        t = int(row["step"])
        assert float(row["tvlars/phase"]) == pytest.approx(phase(t))
        assert float(row["tvlars/effective_batch_size"]) == 32
        assert float(row["tvlars/lr"]) == pytest.approx(1.0 * 32 / 256)
        assert float(row["tvlars/skipped"]) == 0
        lnr = float(row["tvlars/lnr/net.0.weight"])
        ratio = float(row["tvlars/weight_norm/net.0.weight"]) / float(
            row["tvlars/grad_norm/net.0.weight"]
        )
        assert lnr == pytest.approx(ratio)
        assert float(row["tvlars/trust_ratio_min"]) <= float(row["tvlars/trust_ratio/net.0.weight"])
    header = rows[0].keys()
    assert (
        "tvlars/trust_ratio/net.0.weight" in header
        and "tvlars/trust_ratio/net.0.bias" not in header
    )
    assert not any("net.3" in k for k in header)  # filtered out


def test_monitor_logs_lamb_with_a_phase_and_its_trust_ratios(tmp_path: Path) -> None:
    """Time-varying LAMB through the monitor: phi, the applied learning rate, and LAMB's trust
    ratio ``||w|| / ||u||`` for each adapted layer, from a checkpoint-safe config."""
    logger = CSVLogger(tmp_path)
    config = TVLARSConfig(optimizer="lamb", lr=0.01, max_grad_norm=1.0, trust_clip=True)
    model = TinyRegressor(tvlars=config, batch_size=32)
    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        logger=logger,
        log_every_n_steps=4,
        enable_checkpointing=True,
        callbacks=[TVLARSMonitor()],
    )
    trainer.fit(model)
    rows = [r for r in _metrics(logger.log_dir) if r.get("tvlars/phase")]
    assert type(trainer.optimizers[0]).__name__ == "LAMB" and len(rows) == 4
    phase = model.tvlars_plan.phase
    for row in rows:
        assert float(row["tvlars/phase"]) == pytest.approx(phase(int(row["step"])))
        assert float(row["tvlars/lr"]) == pytest.approx(0.01 * 32 / 256)
        assert 0 < float(row["tvlars/trust_ratio/net.0.weight"]) <= 1.0  # trust_clip
        assert "tvlars/trust_ratio/net.0.bias" not in row
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)  # LAMB's state and the config load safely
    assert saved["hyper_parameters"]["tvlars"].optimizer == "lamb"
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved["optimizer_states"][0]["state"][0])


def test_monitor_trust_ratio_equals_optimizer_rule(tmp_path: Path) -> None:
    """The logged r is eta ||w|| / ||g + beta w|| recomputed from the logged norms (beta = 0)."""
    logger = CSVLogger(tmp_path)
    model = TinyRegressor(tvlars=TVLARSConfig(weight_decay=0.0, trust_coefficient=2e-3))
    trainer = _trainer(
        tmp_path, max_steps=1, logger=logger, log_every_n_steps=1, callbacks=[TVLARSMonitor()]
    )
    trainer.fit(model)
    (row,) = [r for r in _metrics(logger.log_dir) if r.get("tvlars/phase")]
    for name in ("net.0.weight", "net.3.weight"):
        expected = (
            2e-3 * float(row[f"tvlars/weight_norm/{name}"]) / float(row[f"tvlars/grad_norm/{name}"])
        )
        assert float(row[f"tvlars/trust_ratio/{name}"]) == pytest.approx(expected, rel=1e-5)


def test_monitor_with_tensorboard_histograms(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    trainer = _trainer(
        tmp_path,
        max_steps=3,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[TVLARSMonitor(histograms=True, per_layer=False)],
    )
    trainer.fit(TinyRegressor())
    logger.experiment.flush()
    events = EventAccumulator(
        logger.log_dir, size_guidance={"histograms": 0, "scalars": 0}
    ).Reload()
    assert {"tvlars/phase", "tvlars/lr", "tvlars/trust_ratio_max"} <= set(events.Tags()["scalars"])
    assert not any("/weight_norm/" in t for t in events.Tags()["scalars"])
    assert {"tvlars/trust_ratio", "tvlars/lnr"} <= set(events.Tags()["histograms"])
    assert len(events.Scalars("tvlars/phase")) == 3


def test_monitor_warns_once_when_trust_ratios_explode(tmp_path: Path) -> None:
    cfg = TVLARSConfig(trust_coefficient=50.0)  # r = 50 ||w|| / ||u|| >> 1
    trainer = _trainer(
        tmp_path,
        max_steps=3,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[TVLARSMonitor(warn_trust_ratio=1.0)],
    )
    with pytest.warns(
        UserWarning, match=r"trust ratio of 'net\.\d\.weight' is .* has exploded"
    ) as rec:
        trainer.fit(TinyRegressor(tvlars=cfg))
    assert sum("has exploded" in str(w.message) for w in rec) == 1


def test_monitor_refuses_other_optimizers(tmp_path: Path) -> None:
    class AdamModel(TinyRegressor):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

    trainer = _trainer(
        tmp_path, max_steps=1, logger=CSVLogger(tmp_path), callbacks=[TVLARSMonitor()]
    )
    with pytest.raises(
        ValueError,
        match=r"TVLARSMonitor needs a TVLARS or LAMB optimizer, but the trainer has \[.AdamW.\]",
    ):
        trainer.fit(AdamModel())


def test_monitor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps=0 is invalid"):
        TVLARSMonitor(log_every_n_steps=0)
    with pytest.raises(TypeError, match="name_filter=3 is invalid"):
        TVLARSMonitor(name_filter=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- bad setups


def test_config_validation_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"phase.mode='fast' is invalid: expected one of 'fitted'"):
        TVLARSConfig(phase=PhaseConfig(mode="fast"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"phase.decay=0.1 has no effect with phase.mode='fitted'"):
        TVLARSConfig(phase=PhaseConfig(decay=0.1))
    with pytest.raises(
        ValueError, match=r"phase.mode='explicit' needs phase.decay and phase.delay"
    ):
        TVLARSConfig(phase=PhaseConfig(mode="explicit", delay=2.0))
    with pytest.raises(ValueError, match=r"phase.alpha=2.0 has no effect with phase.mode='off'"):
        TVLARSConfig(phase=PhaseConfig(mode="off", alpha=2.0))
    with pytest.raises(ValueError, match=r"final_lr_ratio=0.1 has no effect with lr_schedule='co"):
        TVLARSConfig(final_lr_ratio=0.1)
    with pytest.raises(ValueError, match="lr=0 is invalid"):
        TVLARSConfig(lr=0)
    assert TVLARSConfig(phase={"mode": "off"}).phase == PhaseConfig(mode="off")  # YAML dicts


def test_deepspeed_zero_is_refused() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed itself is not installed
    strategy.config = {"zero_optimization": {"stage": 2}}

    class FakeTrainer:
        pass

    trainer = FakeTrainer()
    trainer.strategy = strategy  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"DeepSpeedStrategy\(stage=2\) is not supported"):
        check_strategy(trainer.strategy)  # type: ignore[arg-type]
    strategy.config = {"zero_optimization": {"stage": 0}}
    check_strategy(trainer.strategy)  # type: ignore[arg-type]


def test_module_without_parameters_gets_a_clear_error(tmp_path: Path) -> None:
    class Empty(TinyRegressor):
        def __init__(self) -> None:
            super().__init__()
            self.net.requires_grad_(False)

    with pytest.raises(ValueError, match="has no trainable parameters"):
        _trainer(tmp_path, max_steps=1).fit(Empty())


def test_unknown_run_length_needs_an_explicit_phase(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run length, which is unknown.*max_steps"):
        _trainer(tmp_path, max_epochs=-1, max_steps=-1).fit(TinyRegressor())


def test_lazy_top_level_exports_are_the_lightning_packages_public_names() -> None:
    import lightning_tvlars
    import lightning_tvlars.lightning

    plumbing = {
        "ScheduleSync",
        "EndProcessGroupAtExit",
    }  # reachable from lightning_tvlars.lightning
    assert (
        set(lightning_tvlars._LIGHTNING_NAMES) == set(lightning_tvlars.lightning.__all__) - plumbing
    )
    for name in lightning_tvlars._LIGHTNING_NAMES:
        assert getattr(lightning_tvlars, name) is getattr(lightning_tvlars.lightning, name)


def test_lamb_with_a_warmup_and_cosine_from_lightning_cli_flags(tmp_path: Path) -> None:
    """The recipe's options are LightningCLI flags of a module that takes ``tvlars``."""
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        TinyRegressor,
        args=[
            "--model.tvlars.optimizer=lamb",
            "--model.tvlars.lr=0.01",
            "--model.tvlars.phase.mode=off",
            "--model.tvlars.warmup_fraction=0.25",
            "--model.tvlars.lr_schedule=polynomial",
            "--model.tvlars.max_grad_norm=1.0",
            "--model.batch_size=64",
            "--trainer.max_steps=8",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model)
    (optimizer,) = cli.trainer.optimizers
    (config,) = cli.trainer.lr_scheduler_configs
    assert type(optimizer).__name__ == "LAMB" and optimizer.step_count == 8
    assert optimizer.defaults["max_grad_norm"] == 1.0 and optimizer.phase is None
    scheduler = config.scheduler
    assert scheduler.plan.warmup_steps == 2 and scheduler.lr_schedule == "polynomial"
    assert optimizer.last_step_stats.lr[0] == pytest.approx(scheduler.applied_lr(7))
