"""Tables and figures of the accuracy benchmark (markdown and matplotlib PNGs)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_tvlars.bench.accuracy import Preset, _config, _data, _module, _trainer, best_lr
from lightning_tvlars.bench.baselines import BaselineConfig
from lightning_tvlars.optim import TVLARS

TASK_TITLES = {
    "classification": "Classification (test accuracy)",
    "barlow_twins": "Barlow Twins (kNN test accuracy)",
}


def summary(rows: Sequence[dict[str, Any]], preset: Preset, tasks: Sequence[str]) -> list[dict]:
    """Per (task, batch, optimizer): the chosen lr and test accuracy mean / std over seeds."""
    out = []
    first = preset.seeds[0]
    for task in tasks:
        for batch_size in preset.batch_sizes:
            for optimizer in preset.lr_grid:
                lr = best_lr(rows, task, optimizer, batch_size, first)
                acc = [
                    float(r["accuracy"])
                    for r in rows
                    if (r["task"], r["optimizer"], int(r["batch_size"]), float(r["lr"]))
                    == (task, optimizer, batch_size, lr)
                ]
                out.append(
                    {
                        "task": task,
                        "batch_size": batch_size,
                        "optimizer": optimizer,
                        "lr": lr,
                        "mean": statistics.fmean(acc),
                        "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                        "n": len(acc),
                    }
                )
    return out


def markdown_table(stats: Sequence[dict], preset: Preset, tasks: Sequence[str]) -> str:
    optimizers = list(preset.lr_grid)
    lines = []
    for task in tasks:
        lines += [
            f"### {TASK_TITLES[task]}",
            "",
            "| batch | " + " | ".join(optimizers) + " |",
            "|---:|" + "---|" * len(optimizers),
        ]
        for batch_size in preset.batch_sizes:
            cells = []
            row = {
                s["optimizer"]: s
                for s in stats
                if s["task"] == task and s["batch_size"] == batch_size
            }
            best = max(row[o]["mean"] for o in optimizers)
            for o in optimizers:
                s = row[o]
                text = f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} (lr {s['lr']:g})"
                cells.append(f"**{text}**" if s["mean"] == best else text)
            lines.append(f"| {batch_size} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(stats: Sequence[dict], preset: Preset, tasks: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for optimizer in preset.lr_grid:
            points = [s for s in stats if s["task"] == task and s["optimizer"] == optimizer]
            ax.errorbar(
                [p["batch_size"] for p in points],
                [100 * p["mean"] for p in points],
                yerr=[100 * p["std"] for p in points],
                marker="o",
                capsize=3,
                label=optimizer,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(TASK_TITLES[task])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    rows: Sequence[dict[str, Any]],
    preset: Preset,
    out: Path,
    tasks: Sequence[str],
    environment: str,
    command: str,
) -> None:
    """``accuracy.md`` (table, command, environment) and ``accuracy.png``."""
    stats = summary(rows, preset, tasks)
    plot_accuracy(stats, preset, tasks, out / "accuracy.png")
    wall = sum(float(r["wall_seconds"]) for r in rows) / 60
    text = [
        "# Accuracy benchmark (MNIST-1D)",
        "",
        f"Reproduce: `{command}` (resumable; raw rows in `accuracy.csv`).",
        "",
        f"Environment: {environment}. Total training time {wall:.0f} min.",
        "",
        f"Grid: batch sizes {list(preset.batch_sizes)}, seeds {list(preset.seeds)}, "
        f"base learning rates (at batch 256) {preset.lr_grid}, epochs {preset.epochs}, "
        f"{preset.num_samples} generated samples ({preset.val_size} held out for validation), "
        f"warm-up {preset.warmup_fraction:.0%} of the epochs for the baselines. The learning "
        "rate is chosen on validation accuracy of seed 0; cells give test accuracy (%) "
        "mean ± std over seeds at that rate; the best mean per row is bold.",
        "",
        markdown_table(stats, preset, tasks),
        "![accuracy vs batch size](accuracy.png)",
        "",
        "![phase, learning rate and trust ratio](curves.png)",
        "",
    ]
    (out / "accuracy.md").write_text("\n".join(text))


class _Recorder(pl.Callback):
    """Per optimizer step: learning rate, phase and median trust ratio of adapted tensors."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, TVLARS)
        stats = optimizer.last_step_stats
        if stats is not None and (not self.rows or self.rows[-1][0] != stats.step):
            adapted = [
                r for r, a in zip(stats.trust_ratio.tolist(), stats.adapted, strict=True) if a
            ]
            self.rows.append(
                (stats.step, stats.lr[0], float(stats.phase), statistics.median(adapted))
            )


def plot_curves(preset: Preset, out: Path, lr: float = 1.0) -> None:
    """TVLARS (no warm-up) next to LARS + warm-up (TVLARS with phi = 1): lr, phi, trust ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for name, config in (
        ("TVLARS, no warm-up", _config(preset, "tvlars", lr)),
        ("LARS + warm-up", BaselineConfig(lr=lr, warmup_fraction=preset.warmup_fraction)),
    ):
        pl.seed_everything(0, verbose=False)
        recorder = _Recorder()
        _trainer(preset.epochs["classification"], [recorder]).fit(
            _module(preset, "classification", config), _data(preset, preset.curves_batch_size)
        )
        runs[name] = recorder.rows
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for name, rows in runs.items():
        steps = [r[0] for r in rows]
        axes[0].plot(steps, [r[1] for r in rows], label=name)
        axes[1].plot(steps, [r[2] for r in rows], label=name)
        axes[2].plot(steps, [r[3] for r in rows], label=name)
        axes[3].plot(steps, [r[1] * r[2] * r[3] for r in rows], label=name)
    titles = (
        "learning rate",
        "phase phi(t)",
        "median trust ratio r (adapted tensors)",
        "effective step lr x phi x median r",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].set_yscale("log")
    axes[3].set_yscale("log")
    fig.suptitle(f"MNIST-1D classification, batch {preset.curves_batch_size}, base lr {lr:g}")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
