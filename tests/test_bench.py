"""The accuracy benchmark: the pipeline end to end, and its plan."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning_tvlars.bench import accuracy


def test_accuracy_benchmark_quick_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    accuracy.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3  # tasks x batch sizes x optimizers
    assert set(rows[0]) >= {
        "task",
        "optimizer",
        "batch_size",
        "seed",
        "lr",
        "accuracy",
        "epochs",
        "wall_seconds",
    }
    assert {r["optimizer"] for r in rows} == {"tvlars", "lars+warmup", "lamb+warmup"}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    report = (tmp_path / "accuracy.md").read_text()
    assert "| batch | tvlars | lars+warmup | lamb+warmup |" in report
    assert "lightning-tvlars bench --quick" in report
    for figure in ("accuracy.png", "curves.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
    accuracy.main(["--quick", "--out", str(tmp_path), "--tasks", "classification"])
    with open(tmp_path / "accuracy.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)  # resumed: nothing re-run


def test_plan_selects_lr_on_validation_before_other_seeds() -> None:
    preset = accuracy.Preset(
        batch_sizes=(64,),
        seeds=(0, 1),
        lr_grid={"tvlars": (0.1, 1.0)},
        epochs={"classification": 1},
        num_samples=100,
        val_size=10,
    )
    first = accuracy.plan(preset, [], ["classification"])
    assert [(r[3], r[4]) for r in first] == [(0, 0.1), (0, 1.0)]
    rows = [
        {
            "task": "classification",
            "optimizer": "tvlars",
            "batch_size": "64",
            "seed": "0",
            "lr": str(lr),
            "val_accuracy": str(v),
            "accuracy": "0.5",
        }
        for lr, v in ((0.1, 0.9), (1.0, 0.8))
    ]
    assert accuracy.plan(preset, rows, ["classification"]) == [
        ("classification", "tvlars", 64, 1, 0.1)
    ]
