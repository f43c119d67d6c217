"""The standalone ``pytorch_lightning`` package (lightly's): mixin, helper, sync and monitor."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from lightning_helpers import regression_data
from pytorch_lightning.callbacks import GradientAccumulationScheduler
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_tvlars import (
    TVLARS,
    PhaseConfig,
    TVLARSConfig,
    TVLARSMixin,
    TVLARSMonitor,
    TVLARSScheduler,
    configure_tvlars,
)
from lightning_tvlars.lightning import ScheduleSync


class Regressor(TVLARSMixin, pl.LightningModule):
    """TinyRegressor's network on the standalone package."""

    def __init__(self, tvlars: TVLARSConfig | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(), batch_size=16)


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_mixin_sync_and_monitor_under_a_pytorch_lightning_trainer(tmp_path: Path) -> None:
    config = TVLARSConfig(lr=1.0, base_batch_size=16, phase=PhaseConfig(mode="off"))
    model = Regressor(tvlars=config)
    lrs: dict[int, float] = {}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        limit_train_batches=4,
        log_every_n_steps=1,
        # pytorch_lightning's scheduler: ScheduleSync must see it to re-plan at epoch 1
        callbacks=[GradientAccumulationScheduler({1: 2}), TVLARSMonitor(), Record()],
    )
    trainer.fit(model)
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, TVLARS) and optimizer.step_count == 6  # 4 + 4 / 2
    assert any(isinstance(c, ScheduleSync) for c in trainer.callbacks)
    assert lrs == {0: pytest.approx(1.0), 1: pytest.approx(2.0)}  # x 16/16, then x 32/16
    assert model.tvlars_plan is not None and model.tvlars_plan.effective_batch_size == 32
    assert float(trainer.callback_metrics["tvlars/lr"]) == pytest.approx(2.0)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[union-attr]
        rows = [r for r in csv.DictReader(f) if r.get("tvlars/phase")]
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert "tvlars/trust_ratio/net.0.weight" in rows[0]


class TwoNetworks(pl.LightningModule):
    """The helper with parameters=...: only the first network is trained by TVLARS."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        self.frozen = nn.Linear(2, 2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.frozen(self.body(x)), y)

    def configure_optimizers(self) -> Any:
        return configure_tvlars(self, {"lr": 0.5, "base_batch_size": 16}, parameters=self.body)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(64), batch_size=16)


def test_configure_tvlars_under_a_pytorch_lightning_trainer(tmp_path: Path) -> None:
    model = TwoNetworks()
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[TVLARSMonitor()])
    trainer.fit(model)
    (optimizer,) = trainer.optimizers
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.body.parameters()}
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, TVLARSScheduler) and config.interval == "step"
    assert config.scheduler.plan.total_steps == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # x 16/16


def test_a_class_that_is_not_a_lightning_module_gets_a_clear_message() -> None:
    class Forgot(TVLARSMixin, nn.Module):
        def __init__(self, tvlars: TVLARSConfig | None = None) -> None:
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(TypeError, match=r"Forgot uses TVLARSMixin but is not a LightningModule"):
        Forgot()
    with pytest.raises(TypeError, match=r"inherit TVLARSMixin first"):
        TVLARSMixin.configure_optimizers(nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_module_before_the_mixin_is_refused_when_defined(package: str) -> None:
    import importlib

    base = importlib.import_module(package).LightningModule
    with pytest.raises(TypeError, match=r"inherits .*LightningModule before TVLARSMixin"):
        type("Reversed", (base, TVLARSMixin), {})


def test_a_dict_config_is_validated_when_the_module_is_built() -> None:
    with pytest.raises(ValueError, match=r"lr=-1 is invalid: expected a finite number > 0"):
        Regressor(tvlars={"lr": -1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"phase.decay=0.1 has no effect"):
        Regressor(tvlars={"phase": {"decay": 0.1}})  # type: ignore[arg-type]
    shared = TVLARSConfig(lr=0.3)
    first, second = Regressor(tvlars=shared), Regressor(tvlars=shared)
    first.hparams["tvlars"].lr = 9.0
    assert second.tvlars_config.lr == 0.3 and shared.lr == 0.3  # each module has its own copy
    assert first.tvlars_config.lr == 9.0
