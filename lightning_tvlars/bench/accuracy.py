"""Accuracy benchmark: TVLARS, LARS and LAMB, with a phase or a warm-up, on MNIST-1D.

``lightning-tvlars bench`` (or ``python -m lightning_tvlars.bench``) runs the protocol of
:mod:`lightning_tvlars.bench.protocol` for a preset, appending one CSV row per finished run,
then writes the report (:mod:`lightning_tvlars.bench.report`)::

    lightning-tvlars bench --preset cpu --jobs 2              # docs/benchmarks/accuracy.*
    lightning-tvlars bench --preset gpu --max-minutes 7       # one chunk of the GPU preset
    lightning-tvlars bench --preset gpu --prepare-data        # generate its data set, then exit
    lightning-tvlars bench --quick                            # the pipeline on a tiny size (CI)

The arms are the product's recipe (:class:`~lightning_tvlars.TVLARSConfig`), on the same
parameter groups (biases and normalization parameters neither adapted nor decayed), weight
decay 5e-4, trust coefficient 1e-3 (LARS):

* ``tvlars``: the phase from step 0, no warm-up, constant learning rate (the paper's form);
* ``tvlars-cosine``: the same with cosine annealing;
* ``lars``: LARS without warm-up, constant learning rate (the paper's own baseline);
* ``lars-warmup``: LARS, linear warm-up, then constant;
* ``lars-warmup-phase``: a warm-up, and the phase chosen for ``tvlars`` (the decay without the
  paper's start);
* ``lars-warmup-cosine``: warm-up then cosine (the usual large-batch LARS recipe);
* ``lamb-warmup-cosine``: the package's LAMB, warm-up then cosine, square-root LR scaling;
* ``tvlamb``: LAMB with the phase, no warm-up, constant learning rate.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightning_tvlars._validation import (
    OneLineArgumentParser,
    device_argument,
    int_argument,
    non_negative_float_argument,
)
from lightning_tvlars.bench.protocol import ARMS, PRESETS, TASKS, Preset, cell_state

CURVE_ARMS = ("tvlars", "lars-warmup-cosine")


def environment(device: str, jobs: int) -> str:
    """Versions, device and parallelism, for the report."""
    import lightning
    import torch

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover - timm is in the bench extra
        timm_version = "absent"
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return (
        f"torch {torch.__version__}, lightning {lightning.__version__}, timm {timm_version}, "
        f"Python {platform.python_version()}, {where}, {jobs} run(s) in parallel"
        + (", one torch thread each" if jobs > 1 else f", {torch.get_num_threads()} thread(s)")
    )


def plot_curves(preset: Preset, rows: Sequence[dict[str, Any]], out: Path, device: str) -> bool:
    """``curves.png``: learning rate, phase, median trust ratio and effective step of the
    tuned ``tvlars`` and ``lars-warmup-cosine`` (both TVLARS code) at the largest batch, seed 0
    of the evaluation seeds. ``False`` (nothing written) while they are not tuned."""
    import statistics

    from lightning_tvlars.bench.protocol import RunSpec
    from lightning_tvlars.bench.report import _pyplot
    from lightning_tvlars.bench.train import run
    from lightning_tvlars.optim.base import LayerwiseOptimizer

    task = "classification"
    if task not in preset.tasks or not set(CURVE_ARMS) <= set(preset.arms[task]):
        return False
    batch_size = max(preset.batch_sizes[task])
    curves: dict[str, list[tuple[int, float, float, float]]] = {}
    for name in CURVE_ARMS:
        state = cell_state(preset, task, batch_size, ARMS[name], rows)
        if state.lr is None or state.setting is None:
            return False
        records: list[tuple[int, float, float, float]] = []

        def record(step: int, optimizer: Any, records: list = records) -> None:
            assert isinstance(optimizer, LayerwiseOptimizer)
            stats = optimizer.last_step_stats
            if stats is not None:
                ratios = [
                    r for r, a in zip(stats.trust_ratio.tolist(), stats.adapted, strict=True) if a
                ]
                records.append((step, stats.lr[0], float(stats.phase), statistics.median(ratios)))

        spec = RunSpec(
            task, name, batch_size, preset.seeds[0], "eval", "eval", state.lr, state.setting, 0.0
        )
        run(
            spec, replace(preset, probe=replace(preset.probe, iterations=1)), device, on_step=record
        )
        curves[f"{name} (lr {state.lr:g}, {state.setting})"] = records
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for label, records in curves.items():
        steps = [r[0] for r in records]
        axes[0].plot(steps, [r[1] for r in records], label=label)
        axes[1].plot(steps, [r[2] for r in records], label=label)
        axes[2].plot(steps, [r[3] for r in records], label=label)
        axes[3].plot(steps, [r[1] * r[2] * r[3] for r in records], label=label)
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
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    axes[3].set_yscale("log")
    fig.suptitle(f"MNIST-1D classification, batch {batch_size}, the tuned settings")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    return True


def prepare_data(preset: Preset) -> Path:
    """Generate (or find) the preset's data set in the cache; return its path."""
    from lightning_tvlars.bench.train import DATA_SEED, dataset
    from lightning_tvlars.examples.mnist1d import cache_path

    dataset(preset)
    return cache_path(
        preset.num_samples, DATA_SEED, preset.corr_noise_scale, preset.iid_noise_scale
    )


def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="lightning-tvlars bench",
        description="Accuracy of TVLARS (no warm-up) vs LARS and LAMB with warm-up on MNIST-1D: "
        "equal tuning, fresh evaluation seeds, Welch tests with Holm's correction, sharpness.",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="cpu: classification (8 arms) and Barlow Twins (5 arms) at batch 4096 and 1024, "
        "2 workers, about 5 h on 2 cores; gpu: Barlow Twins, the deeper ResNet and "
        "classification at batch 4096-16384 on one GPU, 12 workers, in chunks of "
        "--max-minutes (default: cpu)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the preset's protocol on a tiny size: checks the pipeline end to end (CI)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default: docs/benchmarks, or bench-quick with --quick)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=None,
        help="run and report only these of the preset's tasks (default: all of them)",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int_argument(1),
        default=None,
        metavar="B",
        help="run and report only these of the preset's batch sizes (default: all of them)",
    )
    parser.add_argument(
        "--device",
        type=device_argument,
        default=None,
        help="cpu, cuda or cuda:N (default: the preset's)",
    )
    parser.add_argument(
        "--jobs",
        type=int_argument(1),
        default=None,
        metavar="N",
        help="runs in parallel worker processes, one torch thread each (default: the "
        "preset's; 1 runs in this process)",
    )
    parser.add_argument(
        "--max-minutes",
        type=non_negative_float_argument,
        default=None,
        metavar="M",
        help="start no run after M minutes, then write the report from what is there",
    )
    parser.add_argument(
        "--threads",
        type=int_argument(1),
        default=1,
        help="torch threads of the runs made in this process (--jobs 1, and the curves); "
        "workers always use one (default: 1)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the CSV, run nothing"
    )
    parser.add_argument(
        "--prepare-data",
        action="store_true",
        help="generate the preset's data set into the cache ($LIGHTNING_TVLARS_CACHE), then exit",
    )
    parser.add_argument(
        "--no-curves", action="store_true", help="skip the learning-rate / phase curves figure"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    preset = PRESETS[args.preset]
    if args.quick:
        preset = preset.quick()
    if args.tasks:
        unknown = set(args.tasks) - set(preset.tasks)
        if unknown:
            raise SystemExit(f"--tasks {' '.join(sorted(unknown))}: not in preset {preset.name!r}")
        preset = replace(preset, tasks=tuple(t for t in preset.tasks if t in args.tasks))
    if args.batch_sizes:
        sizes = {b for t in preset.tasks for b in preset.batch_sizes[t]}
        unknown_sizes = set(args.batch_sizes) - sizes
        if unknown_sizes:
            raise SystemExit(
                f"--batch-sizes {' '.join(map(str, sorted(unknown_sizes)))}: not in preset "
                f"{preset.name!r} (its batch sizes: {' '.join(map(str, sorted(sizes)))})"
            )
        chosen = {
            t: tuple(b for b in preset.batch_sizes[t] if b in args.batch_sizes)
            for t in preset.tasks
        }
        preset = replace(
            preset,
            tasks=tuple(t for t in preset.tasks if chosen[t]),
            batch_sizes={t: b for t, b in chosen.items() if b},
        )
    if args.prepare_data:
        path = prepare_data(preset)
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return
    out = args.out or Path("bench-quick" if args.quick else "docs/benchmarks")
    path = out / f"{preset.stem}.csv"
    if args.report_only and not path.exists():
        parser.error(f"--report-only: no {path} to write the report from (--out {out})")
    import torch

    torch.set_num_threads(args.threads)
    device = args.device or preset.device
    jobs = args.jobs or (1 if args.quick else preset.jobs)
    given = argv if argv is not None else sys.argv[1:]
    # What produces the rows: a report-only rewrite names the command that ran them.
    command = " ".join(["lightning-tvlars bench", *(a for a in given if a != "--report-only")])
    from lightning_tvlars.bench import report
    from lightning_tvlars.bench.runner import read_rows, run_protocol

    started = time.perf_counter()
    failures: list[str] = []
    if args.report_only:
        rows = read_rows(path)
    else:
        print(
            f"{time.strftime('%H:%M:%S')} preset {preset.name} on {device}, {jobs} job(s), "
            f"rows in {path}",
            flush=True,
        )
        rows, failures = run_protocol(
            preset,
            path,
            device=device,
            jobs=jobs,
            max_minutes=args.max_minutes,
            log=lambda line: print(line, flush=True),
        )
        if not args.no_curves and preset.device == "cpu":
            plot_curves(preset, rows, out, device)
    page = report.write_report(
        preset,
        rows,
        out,
        command=command,
        environment=environment(device, jobs),
        failures=failures,
    )
    print(f"done in {time.perf_counter() - started:.0f} s: {page}", flush=True)
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed; see {page}")
