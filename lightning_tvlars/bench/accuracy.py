"""Accuracy benchmark: TVLARS without warm-up against LARS and LAMB with warm-up, on MNIST-1D.

``lightning-tvlars bench [--quick]`` runs, for each task (classification, Barlow Twins) and
batch size, every optimizer over its learning-rate grid on seed 0, picks the rate with the best
*validation* accuracy, then trains the other seeds at that rate. Test accuracy of the chosen
setting is reported as mean and standard deviation over seeds. Everything but the optimizer
(model, data, epochs, evaluation) is shared. Finished runs are read back from the CSV, so an
interrupted benchmark resumes where it stopped.

Optimizers (all on the same parameter groups, weight decay 5e-4, trust coefficient 1e-3):

* ``tvlars``: TVLARS, constant learning rate, no warm-up, phase fitted to the run;
* ``lars+warmup``: lightly's ``LARS`` with linear warm-up then cosine decay to 0.001 x peak;
* ``lamb+warmup``: timm's ``Lamb`` with the same schedule (sqrt learning-rate scaling).
"""

from __future__ import annotations

import argparse
import csv
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch.utils.data import DataLoader

from lightning_tvlars.bench.baselines import BaselineConfig, configure_baseline
from lightning_tvlars.examples.barlow_twins import BarlowTwins1D
from lightning_tvlars.examples.classifier import MNIST1DClassifier
from lightning_tvlars.examples.mnist1d import NUM_CLASSES, MNIST1DDataModule
from lightning_tvlars.lightning import TVLARSConfig

TASKS = ("classification", "barlow_twins")
FIELDS = (
    "task",
    "optimizer",
    "batch_size",
    "seed",
    "lr",
    "accuracy",
    "val_accuracy",
    "epochs",
    "steps",
    "wall_seconds",
)

#: Options of each benchmarked optimizer, apart from lr (``None``: TVLARS with defaults).
OPTIMIZERS: dict[str, dict[str, Any] | None] = {
    "tvlars": None,
    "lars+warmup": {"optimizer": "lightly-lars", "lr_scaling": "linear"},
    "lamb+warmup": {"optimizer": "timm-lamb", "lr_scaling": "sqrt"},
}


@dataclass(frozen=True)
class Preset:
    """The grid: batch sizes, seeds, base learning rates (at batch 256), epochs, data size."""

    batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    lr_grid: dict[str, tuple[float, ...]]
    epochs: dict[str, int]
    num_samples: int
    val_size: int
    warmup_fraction: float = 0.2  # the paper: 20 of 100 epochs
    width: int = 16
    blocks: int = 1
    curves_batch_size: int = 4096
    tasks: tuple[str, ...] = field(default=TASKS)


PRESETS = {
    "full": Preset(
        batch_sizes=(256, 1024, 4096, 8192),
        seeds=(0, 1, 2),
        lr_grid={
            "tvlars": (0.3, 1.0, 3.0),
            "lars+warmup": (0.3, 1.0, 3.0),
            "lamb+warmup": (1e-3, 3e-3, 1e-2),
        },
        epochs={"classification": 12, "barlow_twins": 8},
        num_samples=40_000,
        val_size=2_000,
    ),
    "quick": Preset(
        batch_sizes=(256, 1024),
        seeds=(0,),
        lr_grid={"tvlars": (1.0,), "lars+warmup": (1.0,), "lamb+warmup": (3e-3,)},
        epochs={"classification": 2, "barlow_twins": 1},
        num_samples=3_000,
        val_size=300,
        curves_batch_size=256,
    ),
}


def _config(preset: Preset, optimizer: str, lr: float) -> TVLARSConfig | BaselineConfig:
    options = OPTIMIZERS[optimizer]
    if options is None:
        return TVLARSConfig(lr=lr, weight_decay=5e-4)
    return BaselineConfig(
        lr=lr, weight_decay=5e-4, warmup_fraction=preset.warmup_fraction, **options
    )


def _module(preset: Preset, task: str, config: TVLARSConfig | BaselineConfig) -> pl.LightningModule:
    cls = MNIST1DClassifier if task == "classification" else BarlowTwins1D
    if isinstance(config, TVLARSConfig):
        return cls(width=preset.width, blocks=preset.blocks, tvlars=config)
    module = cls(width=preset.width, blocks=preset.blocks)
    module.configure_optimizers = lambda: configure_baseline(module, config)  # type: ignore[method-assign]
    return module


def _data(preset: Preset, batch_size: int) -> MNIST1DDataModule:
    data = MNIST1DDataModule(
        batch_size=batch_size, num_samples=preset.num_samples, val_size=preset.val_size
    )
    data.prepare_data()
    data.setup()
    return data


def _trainer(epochs: int, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


@torch.no_grad()
def classification_accuracy(model: pl.LightningModule, loader: DataLoader) -> float:
    model.eval()
    accuracy = torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")
    for x, y in loader:
        accuracy.update(model(x), y)
    return float(accuracy.compute())


def run_one(
    preset: Preset, task: str, optimizer: str, batch_size: int, seed: int, lr: float
) -> dict[str, Any]:
    """Train one setting and return its CSV row."""
    pl.seed_everything(seed, verbose=False)
    data = _data(preset, batch_size)
    module = _module(preset, task, _config(preset, optimizer, lr))
    trainer = _trainer(preset.epochs[task])
    start = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - start
    if task == "classification":
        val = classification_accuracy(module, data.val_dataloader())
        test = classification_accuracy(module, data.test_dataloader())
    else:
        assert isinstance(module, BarlowTwins1D)
        bank = DataLoader(data.splits["train"], batch_size=2048)
        val = module.knn_accuracy(bank, data.val_dataloader())
        test = module.knn_accuracy(bank, data.test_dataloader())
    return {
        "task": task,
        "optimizer": optimizer,
        "batch_size": batch_size,
        "seed": seed,
        "lr": lr,
        "accuracy": round(test, 5),
        "val_accuracy": round(val, 5),
        "epochs": preset.epochs[task],
        "steps": trainer.global_step,
        "wall_seconds": round(wall, 2),
    }


def _key(row: dict[str, Any]) -> tuple[str, str, int, int, float]:
    return (
        row["task"],
        row["optimizer"],
        int(row["batch_size"]),
        int(row["seed"]),
        float(row["lr"]),
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def best_lr(
    rows: Sequence[dict[str, Any]], task: str, optimizer: str, batch_size: int, seed: int
) -> float:
    """The learning rate with the best validation accuracy on ``seed`` (ties: smaller lr)."""
    candidates = [r for r in rows if _key(r)[:4] == (task, optimizer, batch_size, seed)]
    best = max(candidates, key=lambda r: (float(r["val_accuracy"]), -float(r["lr"])))
    return float(best["lr"])


def plan(preset: Preset, rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[tuple]:
    """The runs still to do: the lr grid on the first seed, then the chosen lr on the others."""
    done = {_key(r) for r in rows}
    todo = []
    first, *others = preset.seeds
    for task in tasks:
        for batch_size in preset.batch_sizes:
            for optimizer, grid in preset.lr_grid.items():
                todo += [
                    (task, optimizer, batch_size, first, lr)
                    for lr in grid
                    if (task, optimizer, batch_size, first, lr) not in done
                ]
    if todo or not others:
        return todo
    for task in tasks:
        for batch_size in preset.batch_sizes:
            for optimizer in preset.lr_grid:
                lr = best_lr(rows, task, optimizer, batch_size, first)
                todo += [
                    (task, optimizer, batch_size, s, lr)
                    for s in others
                    if (task, optimizer, batch_size, s, lr) not in done
                ]
    return todo


def run_grid(preset: Preset, out: Path, tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Run (or resume) the whole grid, appending each finished run to ``out/accuracy.csv``."""
    path = out / "accuracy.csv"
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(path)
    while todo := plan(preset, rows, tasks):
        for index, run in enumerate(todo, 1):
            row = run_one(preset, *run)
            new_file = not path.exists()
            with open(path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                if new_file:
                    writer.writeheader()
                writer.writerow(row)
            rows.append({k: str(v) for k, v in row.items()})
            print(
                f"[{index}/{len(todo)}] {row['task']:>14} {row['optimizer']:>11} "
                f"B={row['batch_size']:<5} seed={row['seed']} lr={row['lr']:<6g} "
                f"test={row['accuracy']:.4f} val={row['val_accuracy']:.4f} "
                f"({row['wall_seconds']:.0f} s)",
                flush=True,
            )
    return rows


def environment() -> str:
    import lightly
    import lightning
    import timm

    return (
        f"torch {torch.__version__}, lightning {lightning.__version__}, lightly "
        f"{lightly.__version__}, timm {timm.__version__}, Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-tvlars bench",
        description="Accuracy of TVLARS (no warm-up) vs LARS and LAMB with warm-up on MNIST-1D.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny grid that checks the pipeline end to end (under 2 minutes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: docs/benchmarks, or bench-quick with --quick)",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # one line per run instead
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS["quick" if args.quick else "full"]
    out = args.out or Path("bench-quick" if args.quick else "docs/benchmarks")
    from lightning_tvlars.bench import report

    started = time.perf_counter()
    rows = run_grid(preset, out, args.tasks)
    report.write_report(
        rows,
        preset,
        out,
        args.tasks,
        environment(),
        command="lightning-tvlars bench" + (" --quick" if args.quick else ""),
    )
    report.plot_curves(preset, out)
    print(f"done in {time.perf_counter() - started:.0f} s: {out / 'accuracy.md'}")
