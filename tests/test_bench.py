"""Benchmarks: step counters (ops, host syncs) as regressions; the accuracy pipeline end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_tvlars.bench import accuracy, step


def test_tvlars_step_op_count_and_no_host_syncs() -> None:
    """Two parameter groups: a few dozen dispatched ops, none of them a host sync."""
    shapes = step.parameter_shapes("tiny")
    (result,) = step.measure(["TVLARS foreach"], shapes, "cpu", repeats=2)
    assert result.ops <= 40, result
    assert result.host_syncs == 0
    assert result.state_ratio == 1.0  # one momentum buffer per parameter, as SGD
    # the counter does see syncs: lightly's LARS branches on tensor values in Python
    assert step.measure(["lightly LARS"], shapes, "cpu", repeats=1)[0].host_syncs > 0


def test_op_count_does_not_grow_with_the_number_of_tensors() -> None:
    (small,) = step.measure(["TVLARS foreach"], step.parameter_shapes("tiny"), "cpu", repeats=1)
    many = [torch.Size((8, 8))] * 60 + [torch.Size((8,))] * 60
    (large,) = step.measure(["TVLARS foreach"], many, "cpu", repeats=1)
    assert large.ops == small.ops


def test_op_counter_counts_dispatches() -> None:
    xs = [torch.ones(3), torch.ones(4)]
    with step.OpCounter() as counter:
        torch._foreach_mul_(xs, 2.0)
        bool(xs[0].sum() > 0)
    assert counter.ops["aten._foreach_mul_"] == 1
    assert counter.host_syncs == 1


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


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16", "lm"])
def test_parameter_sets_have_the_expected_sizes(name: str) -> None:
    shapes = step.parameter_shapes(name)
    count = {"resnet50": 161, "vit_b_16": 152, "lm": 51}[name]
    assert len(shapes) == count
