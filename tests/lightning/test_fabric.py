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


def test_lamb_with_a_warmup_and_cosine_in_a_fabric_loop_applies_the_planned_rates() -> None:
    """The family and the recipe's schedules under Fabric: LAMB, a warm-up and a cosine, the
    rate each step applies is the rate the scheduler plans (the same numbers as a Trainer)."""
    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    config = TVLARSConfig(
        optimizer="lamb",
        lr=0.01,
        lr_scaling="sqrt",
        base_batch_size=64,
        phase=PhaseConfig(mode="off"),
        warmup_fraction=0.2,
        lr_schedule="cosine",
    )
    optimizer, scheduler = configure_tvlars_fabric(
        fabric, model, config, total_steps=20, batch_size=64, accumulation=4
    )
    model, optimizer = fabric.setup(model, optimizer)
    applied = []
    for _ in range(20):
        model(torch.randn(64, 4)).square().mean().backward()
        optimizer.step()
        applied.append(optimizer.last_step_stats.lr[0])
        scheduler.step()
        optimizer.zero_grad()
    assert type(scheduler.optimizer).__name__ == "LAMB" and scheduler.batch_scale == 2.0
    assert applied == pytest.approx([scheduler.applied_lr(t) for t in range(20)])
    assert applied[4] == pytest.approx(0.02) and applied[0] == pytest.approx(0.02 / 5)


def test_fabric_never_loads_the_trainer_stack() -> None:
    """``configure_tvlars_fabric`` and the metrics import no Lightning package: a Fabric program
    on the standalone ``lightning_fabric`` never loads ``lightning.pytorch`` because of them."""
    import subprocess
    import sys

    script = """
import sys
import torch
from lightning_fabric import Fabric
from lightning_tvlars import TVLARSConfig, configure_tvlars_fabric, tvlars_metrics
fabric = Fabric(accelerator="cpu", devices=1)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
optimizer, scheduler = configure_tvlars_fabric(fabric, model, TVLARSConfig(), total_steps=3,
                                               batch_size=8)
model, optimizer = fabric.setup(model, optimizer)
for _ in range(3):
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
metrics = tvlars_metrics(optimizer, scheduler=scheduler)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pytorch_lightning", "lightning"))
print(len(metrics) > 5, loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "True []", out


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
