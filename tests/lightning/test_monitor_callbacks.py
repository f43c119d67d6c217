"""TVLARSMonitor as a Lightning citizen: callback metrics, Lightning's logging steps, loggers."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import TinyRegressor

from lightning_tvlars import TVLARS, TVLARSMonitor, param_groups, tvlars_metrics
from lightning_tvlars.metrics import SCALAR_METRICS, summary_tensors


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": CSVLogger(tmp_path),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def _rows(trainer: pl.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[union-attr]
        return list(csv.DictReader(f))


def test_model_checkpoint_monitors_a_tvlars_metric(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="tvlars/phase", mode="min")
    model = TinyRegressor(batch_size=32)  # 8 optimizer steps per epoch
    trainer = _trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[TVLARSMonitor(), checkpoint]
    )
    with pytest.warns() as record:
        trainer.fit(model)
    assert not [w for w in record if "could not find the monitored key" in str(w.message)]
    phase = model.tvlars_plan.phase
    # the phase decreases: the best (lowest) is that of the last step, t = 15
    assert checkpoint.best_model_score == pytest.approx(phase(15))
    assert Path(checkpoint.best_model_path).is_file()
    metrics = trainer.callback_metrics
    assert set(metrics) >= {f"tvlars/{name}" for name in SCALAR_METRICS}
    assert not any("/trust_ratio/" in k or "/grad_norm/" in k for k in metrics)  # loggers only
    assert float(metrics["tvlars/effective_batch_size"]) == 32


def stop_when_the_phase_is_below_half() -> EarlyStopping:
    """Stops at the end of the first epoch in which the logged phase is below 0.5."""
    return EarlyStopping(
        monitor="tvlars/phase",
        mode="min",
        stopping_threshold=0.5,
        check_on_train_epoch_end=True,
        patience=100,
    )


def test_early_stopping_on_the_phase_stops_when_it_falls_below_a_threshold(
    tmp_path: Path,
) -> None:
    # 6 epochs of 8 steps, phase fitted halfway at step 24: below 0.5 first at the end of
    # epoch 4 (steps 24..31), whatever Trainer(log_every_n_steps) is.
    stop = stop_when_the_phase_is_below_half()
    model = TinyRegressor(batch_size=32)
    trainer = _trainer(
        tmp_path, max_epochs=6, log_every_n_steps=50, callbacks=[TVLARSMonitor(), stop]
    )
    trainer.fit(model)
    assert trainer.global_step == 32 and trainer.current_epoch == 4
    assert float(trainer.callback_metrics["tvlars/phase"]) < 0.5


def test_a_trainer_without_a_logger_is_refused(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=1, logger=False, callbacks=[TVLARSMonitor()])
    with pytest.raises(ValueError, match=r"TVLARSMonitor needs a logger.*logger=False"):
        trainer.fit(TinyRegressor())


def test_progress_bar_flag_shows_the_whole_model_metrics(tmp_path: Path) -> None:
    with_bar = _trainer(
        tmp_path, max_steps=2, log_every_n_steps=1, callbacks=[TVLARSMonitor(prog_bar=True)]
    )
    with_bar.fit(TinyRegressor())
    assert {"tvlars/phase", "tvlars/lr", "tvlars/trust_ratio_median"} <= set(
        with_bar.progress_bar_metrics
    )
    assert not any("/trust_ratio/" in k for k in with_bar.progress_bar_metrics)
    without = _trainer(tmp_path, max_steps=2, log_every_n_steps=1, callbacks=[TVLARSMonitor()])
    without.fit(TinyRegressor())
    assert not any(k.startswith("tvlars") for k in without.progress_bar_metrics)


class GradNorms(pl.Callback):
    """||g|| of the first weight as the optimizer sees it, per optimizer step."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.norms.append(float(pl_module.net[0].weight.grad.norm()))


def test_accumulated_gradient_norms_are_logged_at_lightnings_steps(tmp_path: Path) -> None:
    # 8 batches, 2 accumulated per step: 4 optimizer steps; Lightning logs when (t + 1) % 2 == 0.
    # Batch 2 is such a step for Lightning's counter but holds half an accumulation window: the
    # monitor must wait for the batch that steps, as Lightning's own logging does.
    record = GradNorms()
    model = TinyRegressor(batch_size=32)
    trainer = _trainer(
        tmp_path,
        max_epochs=1,
        accumulate_grad_batches=2,
        log_every_n_steps=2,
        callbacks=[TVLARSMonitor(), record],
    )
    trainer.fit(model)
    rows = [r for r in _rows(trainer) if r.get("tvlars/phase")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert [int(r["step"]) for r in _rows(trainer) if r.get("train/loss")] == [1, 3]
    logged = [float(r["tvlars/grad_norm/net.0.weight"]) for r in rows]
    assert logged == pytest.approx([record.norms[1], record.norms[3]], rel=1e-6)
    assert all(float(r["tvlars/effective_batch_size"]) == 64 for r in rows)


def test_tvlars_metrics_without_lightning_match_the_monitor_names() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))
    optimizer = TVLARS(param_groups(model, weight_decay=1e-3), lr=0.1)
    assert tvlars_metrics(optimizer) == {} and summary_tensors(optimizer) == {}
    model(torch.randn(16, 4)).square().mean().backward()
    optimizer.step()
    metrics = tvlars_metrics(optimizer, name_filter=r"^0\.")
    assert {k for k in metrics if k.count("/") == 1} == {
        f"tvlars/{n}" for n in SCALAR_METRICS if n != "effective_batch_size"
    }
    assert {k for k in metrics if k.count("/") == 2} == {
        "tvlars/trust_ratio/0.weight",
        *(
            f"tvlars/{family}/0.{p}"
            for family in ("lnr", "weight_norm", "grad_norm")
            for p in ("weight", "bias")
        ),
    }
    grad = float(model[0].weight.grad.norm())
    assert metrics["tvlars/grad_norm/0.weight"] == pytest.approx(grad, rel=1e-6)
    weight_ratios = [metrics["tvlars/trust_ratio/0.weight"]]
    assert metrics["tvlars/trust_ratio_max"] >= max(weight_ratios)
    on_device = summary_tensors(optimizer, prefix="tvlars_1", effective_batch_size=64)
    assert float(on_device["tvlars_1/trust_ratio_median"]) == pytest.approx(
        metrics["tvlars/trust_ratio_median"]
    )
    assert float(on_device["tvlars_1/effective_batch_size"]) == 64
    assert not math.isnan(float(on_device["tvlars_1/phase"]))


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("free_port")
def test_early_stopping_on_a_tvlars_metric_under_ddp_sees_it_on_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EarlyStopping runs on every rank (strict: a missing metric raises there) and the ranks
    # must agree on stopping: the callback metrics are set on every rank, not only rank zero.
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from lightning_tvlars import FittedPhase

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    stop = stop_when_the_phase_is_below_half()
    trainer = _trainer(
        tmp_path,
        devices=2,
        strategy=DDPStrategy(
            start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60)
        ),
        max_epochs=6,
        callbacks=[TVLARSMonitor(), stop],
    )
    trainer.fit(TinyRegressor(batch_size=32))  # 256 samples / (2 x 32): 4 steps per epoch
    # 24 steps planned, halfway at 12: below 0.5 first at the end of epoch 3 (steps 12..15)
    expected = FittedPhase().fit(24)(15)
    assert float(trainer.callback_metrics["tvlars/phase"]) == pytest.approx(expected, rel=1e-5)
    assert float(trainer.callback_metrics["tvlars/effective_batch_size"]) == 64
