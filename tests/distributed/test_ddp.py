"""Data parallelism on 2 CPU processes (gloo): same weights as one process, global batch size."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import (
    EQUIVALENCE_CONFIG,
    EQUIVALENCE_TOLERANCE,
    GlooThreadsAtExit,
    TinyRegressor,
    equivalence_trainer,
    gloo_threads_at_exit,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def _fit(devices: int, per_device_batch: int, tmp_path: Path) -> TinyRegressor:
    torch.manual_seed(0)
    model = TinyRegressor(
        tvlars=EQUIVALENCE_CONFIG,
        batch_size=per_device_batch,
        deterministic_sampler=True,
        double=True,
    )
    strategy = (
        DDPStrategy(
            start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60)
        )
        if devices > 1
        else "auto"
    )
    equivalence_trainer(devices, strategy, default_root_dir=tmp_path).fit(model)
    return model


@pytest.mark.usefixtures("free_port")
def test_ddp_spawn_matches_a_single_process_on_the_same_global_batch(tmp_path: Path) -> None:
    single = _fit(1, 16, tmp_path / "single")
    ddp = _fit(2, 8, tmp_path / "ddp")  # 2 x 8 = the same 16 samples per step
    for (name, a), b in zip(single.named_parameters(), ddp.parameters(), strict=True):
        assert a.dtype == b.dtype == torch.float64  # see equivalence_trainer
        torch.testing.assert_close(a, b, **EQUIVALENCE_TOLERANCE, msg=name)
    untrained = TinyRegressor(double=True)
    moved = sum(
        (a - b).abs().sum()
        for a, b in zip(single.parameters(), untrained.parameters(), strict=True)
    )
    assert moved > 0.1  # the comparison is not between untrained models


@pytest.mark.usefixtures("free_port")
def test_spawned_processes_end_their_process_group_before_python_shuts_down(
    tmp_path: Path,
) -> None:
    """A gloo group left to the interpreter's shutdown can abort a process after a successful
    fit (SIGABRT, "terminate called without an active exception": docs/faq.md). The callback
    that configure_tvlars adds destroys the group at exit, which joins gloo's threads: none may
    be left when the interpreter shuts down."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(
            start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60)
        ),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GlooThreadsAtExit(tmp_path)],
    )
    trainer.fit(TinyRegressor(batch_size=16))
    left = gloo_threads_at_exit(tmp_path)
    assert set(left) == {0, 1}
    assert left in ({0: [], 1: []}, {0: None, 1: None})  # None: no /proc to read names from


@pytest.mark.usefixtures("free_port")
def test_cli_effective_batch_is_per_device_x_devices_x_accumulation(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lightning_tvlars.lightning.cli",
        "fit",
        "--data.batch_size=64",
        "--trainer.devices=2",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--data.num_samples=2000",
        "--data.val_size=200",
        "--model.width=8",
        "--model.blocks=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "effective batch size 256 = 64 per device x 2 data-parallel replica(s) x 2" in run.stderr
    (metrics,) = tmp_path.rglob("metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("tvlars/effective_batch_size")]
    assert rows and all(float(r["tvlars/effective_batch_size"]) == 256 for r in rows)
    assert float(rows[0]["tvlars/lr"]) == pytest.approx(1.0)  # 1.0 x 256 / 256
