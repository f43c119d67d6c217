"""Run the protocol: plan, train (in this process or a pool of workers), append rows to the CSV.

The CSV is the only state: every finished run is appended (and flushed) as one row, and the
plan is recomputed from the rows, so a benchmark (or a ``compare``) stopped at any point
resumes where it was. With ``jobs > 1`` the runs go to that many worker processes (``spawn``,
one torch thread each), which may share one GPU; a new run starts as soon as a worker is free
and the plan allows one. After ``max_minutes`` no run is started; the runs in flight finish.
:func:`run_study` runs any :class:`~lightning_tvlars.bench.protocol.Study` with a training
function; :func:`run_protocol` is the benchmark's.
"""

from __future__ import annotations

import csv
import functools
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from lightning_tvlars.bench.protocol import (
    PROBE_FIELDS,
    SPEC_FIELDS,
    Preset,
    RunSpec,
    Study,
    plan,
)

FIELDS = (
    *SPEC_FIELDS,
    "epochs",
    "steps",
    "train_loss",
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "converged",
    "diverged",
    *PROBE_FIELDS,
    "wall_seconds",
    "device",
    "model_params",
    "code_version",
)

Row = dict[str, Any]


def read_rows(path: Path, fields: Sequence[str] = FIELDS) -> list[Row]:
    """The rows of a CSV with the columns ``fields`` (none if it does not exist).

    Raises:
        ValueError: the file has other columns (a CSV of an older version, or of another
            command).
    """
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and tuple(reader.fieldnames) != tuple(fields):
            whose = "this benchmark's" if tuple(fields) == FIELDS else "this command's"
            raise ValueError(
                f"{path} has the columns {reader.fieldnames}, not {whose}: write to another "
                "--out folder (or move the old file away)"
            )
        return list(reader)


def append_row(path: Path, row: Mapping[str, Any], fields: Sequence[str] = FIELDS) -> Row:
    """Append ``row`` to the CSV (header first if new), flushed; return it as strings."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())
    return {k: str(row[k]) for k in fields}


def _worker_init(threads: int) -> None:
    """A worker process: ``threads`` torch threads, Lightning's info lines off."""
    import logging

    import torch

    torch.set_num_threads(threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _train(spec: RunSpec, *, preset: Preset, device: str) -> Row:
    from lightning_tvlars.bench.train import run

    return run(spec, preset, device)


class _Inline:
    """An executor that runs each task at submission, in this process (``jobs=1``)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[..., Row], *args: Any) -> Future[Row]:
        future: Future[Row] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # reported by the caller, like a worker's error
            future.set_exception(err)
        return future


def _line(row: Mapping[str, Any]) -> str:
    return (
        f"{row['task']:>14} {row['arm']:>18} B={row['batch_size']:<5} {row['role']:>4} "
        f"seed={row['seed']:<2} lr={row['lr']:<6} {row['setting']:<11} "
        f"test={float(row['test_accuracy']):.4f} val={float(row['val_accuracy']):.4f} "
        f"train={float(row['train_accuracy']):.4f} ({float(row['wall_seconds']):.0f} s)"
    )


def run_protocol(
    preset: Preset,
    path: Path,
    *,
    device: str,
    jobs: int,
    max_minutes: float | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[Row], list[str]]:
    """Run (or resume) the preset's protocol, appending to the CSV at ``path``.

    Args:
        preset: what to run.
        path: the CSV (read first: finished runs are not repeated).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        jobs: runs in parallel (worker processes); 1 runs them in this process.
        max_minutes: no run starts after this many minutes (``None``: no limit).
        log: receives one progress line per finished run.

    Returns:
        What :func:`run_study` returns.
    """
    for row in read_rows(path):
        if row["task"] in preset.epochs and int(row["epochs"]) != preset.epochs[row["task"]]:
            raise ValueError(
                f"{path} holds {row['task']} runs of {row['epochs']} epochs, not the "
                f"{preset.epochs[row['task']]} of preset {preset.name!r}: write to another --out "
                "folder"
            )
    return run_study(
        preset,
        path,
        train=functools.partial(_train, preset=preset, device=device),
        jobs=jobs,
        max_minutes=max_minutes,
        log=log,
    )


def run_study(
    study: Study,
    path: Path,
    *,
    train: Callable[[RunSpec], Row],
    jobs: int,
    fields: Sequence[str] = FIELDS,
    max_minutes: float | None = None,
    log: Callable[[str], None] = print,
    line: Callable[[Mapping[str, Any]], str] = _line,
    status: Callable[[Sequence[Row]], str] | None = None,
    write: bool = True,
) -> tuple[list[Row], list[str]]:
    """Run (or resume) the protocol of ``study``, appending to the CSV at ``path``.

    Args:
        study: what to run.
        path: the CSV with the columns ``fields`` (read first: finished runs are not repeated).
        train: trains one run and returns its row (picklable when ``jobs > 1``).
        jobs: runs in parallel (worker processes); 1 runs them in this process.
        max_minutes: no run starts after this many minutes (``None``: no limit).
        log: receives one progress line per finished run.
        line: describes a finished run's row in its progress line.
        status: the rows so far -> where the whole protocol stands (put after the count).
        write: append rows to ``path`` (``False``: keep them in memory only, e.g. on the
            ranks other than 0 of a distributed run).

    Returns:
        All rows of the CSV, and one message per run that raised (such a run is not retried
        in this call; the others go on, unless the first ``jobs`` runs all fail, which stops
        the launching of runs: a setup error such as a missing device or data file).
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs!r} is invalid: expected an int >= 1")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(path, fields)
    started = time.monotonic()
    deadline = math.inf if max_minutes is None else started + 60.0 * max_minutes
    failed: dict[tuple[Any, ...], str] = {}
    in_flight: dict[Future[Row], RunSpec] = {}
    finished_runs = 0
    broken = False
    executor: Any = (
        _Inline()
        if jobs == 1
        else ProcessPoolExecutor(
            jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(1,),
        )
    )
    with executor:
        while True:
            busy = {spec.key for spec in in_flight.values()} | set(failed)
            todo = [spec for spec in plan(study, rows) if spec.key not in busy]
            if time.monotonic() < deadline and not broken:
                while todo and len(in_flight) < jobs:
                    spec = todo.pop(0)
                    try:
                        in_flight[executor.submit(train, spec)] = spec
                    except BrokenExecutor as err:  # a worker died (killed, out of memory)
                        broken = True
                        log(f"worker pool broken ({err}): no more runs are started")
                        break
            elif todo and not in_flight and not broken:
                log(f"time budget of {max_minutes:g} min spent: {len(todo)} ready runs not started")
            if not in_flight:
                break
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = in_flight.pop(future)
                stamp = (
                    f"[{time.strftime('%H:%M:%S')} +{(time.monotonic() - started) / 60:5.1f} min]"
                )
                error = future.exception()
                if error is not None:
                    broken = broken or isinstance(error, BrokenExecutor)
                    failed[spec.key] = f"{spec}: {type(error).__name__}: {error}"
                    log(f"{stamp} FAILED {failed[spec.key]}")
                    if not finished_runs and len(failed) >= jobs and not broken:
                        broken = True  # nothing has worked: a setup error, not a bad run
                        log(f"the first {len(failed)} run(s) all failed: no more runs are started")
                    continue
                row = future.result()
                rows.append(
                    append_row(path, row, fields) if write else {k: str(row[k]) for k in fields}
                )
                finished_runs += 1
                where = (
                    status(rows)
                    if status is not None
                    else f"{len(in_flight)} running, {len(todo)} ready"
                )
                log(f"{stamp} {finished_runs:>4} done, {where} | {line(rows[-1])}")
    return rows, list(failed.values())
