"""Training-throughput cost of ``TVLARSMonitor``: ``lightning-tvlars bench-monitor``.

Trains the MNIST-1D classifier for a fixed number of steps with and without the monitor,
alternating the two in one process (A B A B ...), and reports the median throughput of each
and the overhead. The monitor logs at the trainer's ``log_every_n_steps``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_tvlars._validation import OneLineArgumentParser, int_argument
from lightning_tvlars.examples.classifier import MNIST1DClassifier
from lightning_tvlars.examples.mnist1d import MNIST1DDataModule
from lightning_tvlars.lightning import TVLARSMonitor
from lightning_tvlars.recipe import TVLARSConfig


class TimedMonitor(TVLARSMonitor):
    """The monitor, with the time spent in its per-batch hook accumulated in ``seconds``."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def on_train_batch_end(self, *args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)  # type: ignore[arg-type]
        self.seconds += time.perf_counter() - start


def fit_seconds(
    monitor: bool,
    steps: int,
    log_every_n_steps: int,
    batch_size: int,
    hook_seconds: list[float] | None = None,
) -> float:
    """Wall time of ``steps`` training steps (after Lightning's set-up)."""
    pl.seed_everything(0, verbose=False)
    data = MNIST1DDataModule(batch_size=batch_size, num_samples=20_000, val_size=1_000)
    model = MNIST1DClassifier(tvlars=TVLARSConfig(lr=1.0))
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_start(self, *args: object) -> None:
            times.append(time.perf_counter())

        def on_train_end(self, *args: object) -> None:
            times.append(time.perf_counter())

    callbacks: list[pl.Callback] = [Clock()]
    timed = TimedMonitor()
    if monitor:
        callbacks.append(timed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        log_every_n_steps=log_every_n_steps,
        logger=pl.loggers.CSVLogger("/tmp/lightning_tvlars_bench_monitor"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    if monitor and hook_seconds is not None:
        hook_seconds.append(timed.seconds)
    return times[1] - times[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineArgumentParser(
        prog="lightning-tvlars bench-monitor", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--steps", type=int_argument(1), default=150, help="steps per run (default: 150)"
    )
    parser.add_argument(
        "--rounds",
        type=int_argument(1),
        default=5,
        help="pairs of runs, with and without the monitor, alternating (default: 5)",
    )
    parser.add_argument(
        "--log-every-n-steps",
        type=int_argument(1),
        default=50,
        help="the trainer's logging interval (default: 50, Lightning's)",
    )
    parser.add_argument(
        "--batch-size", type=int_argument(1), default=512, help="batch size (default: 512)"
    )
    parser.add_argument(
        "--threads", type=int_argument(1), default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # one line per run instead
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    fit_seconds(True, 10, args.log_every_n_steps, args.batch_size)  # warm-up, data generation
    runs: dict[bool, list[float]] = {False: [], True: []}
    hook: list[float] = []
    for _ in range(args.rounds):
        for monitor in (False, True):
            runs[monitor].append(
                fit_seconds(monitor, args.steps, args.log_every_n_steps, args.batch_size, hook)
            )
    base, with_monitor = statistics.median(runs[False]), statistics.median(runs[True])
    ratios = [b / a for a, b in zip(runs[False], runs[True], strict=True)]
    print(
        f"{args.steps} steps, batch {args.batch_size}, log every {args.log_every_n_steps} steps, "
        f"{args.rounds} rounds, {torch.get_num_threads()} thread(s)"
    )
    print(f"without monitor: median {base:.2f} s ({args.steps / base:.1f} steps/s)")
    print(f"with monitor:    median {with_monitor:.2f} s ({args.steps / with_monitor:.1f} steps/s)")
    print(
        f"overhead: {100 * (with_monitor / base - 1):+.2f}% (medians); paired ratios "
        f"{', '.join(f'{r:.3f}' for r in ratios)}"
    )
    share = statistics.median(h / t for h, t in zip(hook, runs[True], strict=True))
    logs = args.steps // args.log_every_n_steps + 1
    print(
        f"time inside the monitor's hook: {1e3 * statistics.median(hook) / logs:.2f} ms per "
        f"log step, {100 * share:.2f}% of training time"
    )


if __name__ == "__main__":
    main()
