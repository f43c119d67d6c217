"""TVLARS under Lightning Fabric: the helper, the shared metrics, the example on 2 processes."""

from __future__ import annotations

import csv
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import DDPStrategy
from lightning_helpers import fabric_example_reporting_gloo_threads, gloo_threads_at_exit

from lightning_tvlars import TVLARS, PhaseConfig, TVLARSConfig, TVLARSScheduler
from lightning_tvlars.examples import fabric_mnist1d
from lightning_tvlars.fabric import configure_tvlars_fabric


def _rows(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("tvlars/phase")]


def test_helper_scales_the_lr_with_the_effective_batch_and_fits_the_phase() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer, scheduler = configure_tvlars_fabric(
        fabric,
        model,
        {"lr": 0.5, "base_batch_size": 64},
        total_steps=100,
        batch_size=32,
        accumulation=4,
    )
    assert isinstance(optimizer, TVLARS) and isinstance(scheduler, TVLARSScheduler)
    assert [g["param_names"] for g in optimizer.param_groups] == [
        ["0.weight", "2.weight"],
        ["0.bias", "1.weight", "1.bias", "2.bias"],
    ]
    plan = scheduler.plan
    assert plan.effective_batch_size == 128 and plan.batch_scale == pytest.approx(2.0)
    assert all(g["lr"] == pytest.approx(1.0) for g in optimizer.param_groups)  # 0.5 x 128/64
    assert plan.phase(50) == pytest.approx(0.5) and plan.phase(100) == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"run length, which is unknown"):
        configure_tvlars_fabric(fabric, model, total_steps=None, batch_size=32)
    explicit = TVLARSConfig(
        phase=PhaseConfig(mode="explicit", decay=0.1, delay=2, delay_unit="epochs")
    )
    with pytest.raises(ValueError, match=r"delay_unit='epochs' needs steps_per_epoch"):
        configure_tvlars_fabric(fabric, model, explicit, total_steps=None, batch_size=32)
    _, by_epoch = configure_tvlars_fabric(
        fabric, model, explicit, total_steps=None, batch_size=32, steps_per_epoch=10
    )
    assert by_epoch.plan.phase.delay == 20  # 2 epochs x 10 steps
    with pytest.raises(ValueError, match=r"accumulation=0 is invalid"):
        configure_tvlars_fabric(fabric, model, total_steps=10, batch_size=32, accumulation=0)


def test_example_logs_the_monitor_metrics_through_fabric(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(tmp_path, name="run"))
    result = fabric_mnist1d.train(
        fabric, steps=8, batch_size=64, accumulation=2, num_samples=2000, log_every_n_steps=2
    )
    assert result["steps"] == 8 and result["effective_batch_size"] == 128
    assert result["lr"] == pytest.approx(2.0 * 128 / 256)
    rows = _rows(result["log_dir"])
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7]
    assert all(float(r["tvlars/effective_batch_size"]) == 128 for r in rows)
    assert {"tvlars/trust_ratio/1.weight", "tvlars/grad_norm/1.bias"} <= set(rows[0])
    assert not any(k.startswith("tvlars/trust_ratio/0.") for k in rows[0])  # name_filter
    phases = [float(r["tvlars/phase"]) for r in rows]
    assert phases == sorted(phases, reverse=True) and phases[0] > 0.9


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("free_port")
def test_example_on_two_processes_scales_with_the_world_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fabric = Fabric(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        loggers=CSVLogger(tmp_path, name="run"),
    )
    exits = tmp_path / "exits"
    exits.mkdir()
    result = fabric.launch(
        fabric_example_reporting_gloo_threads,  # fabric_mnist1d.train
        exits,
        steps=4,
        batch_size=32,
        accumulation=2,
        num_samples=2000,
        log_every_n_steps=2,
    )
    assert result["world_size"] == 2 and result["steps"] == 4
    assert result["effective_batch_size"] == 128  # 32 per device x 2 processes x 2 accumulated
    assert result["lr"] == pytest.approx(2.0 * 128 / 256)
    rows = _rows(result["log_dir"])  # rank zero's log only
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert all(float(r["tvlars/effective_batch_size"]) == 128 for r in rows)
    # The example destroys its process group at exit, which joins gloo's threads: none is left
    # to abort the process while the interpreter shuts down (docs/faq.md).
    left = gloo_threads_at_exit(exits)
    assert set(left) == {0, 1}
    assert left in ({0: [], 1: []}, {0: None, 1: None})  # None: no /proc to read names from
