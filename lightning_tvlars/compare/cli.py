"""``lightning-tvlars compare``: does TVLARS help on my model?

Runs the accuracy benchmark's protocol on any LightningModule and LightningDataModule given by
class path, with LightningCLI's ``--model.*``, ``--data.*``, ``--trainer.*`` and ``--config``::

    lightning-tvlars compare --model my_pkg.MyModule --data my_pkg.MyData \\
        --arms tvlars lars-warmup-cosine lamb-warmup-cosine --batch-sizes 1024 4096 \\
        --epochs 10 --trainer.precision bf16-mixed --out compare-mine

Before any run it checks the options, builds the model and data once and validates the
untrained model (a module that cannot be compared is refused in one line), then times a short
probe and says how many runs the protocol takes and about how long. Every finished run is one
row of ``OUT/compare.csv``: the same command resumes an interrupted comparison. The report is
``OUT/compare.md`` with its figures (:mod:`lightning_tvlars.compare.report`).
"""

from __future__ import annotations

import functools
import logging
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_tvlars.bench.protocol import Study, comparisons_for, plan, run_count
from lightning_tvlars.compare.options import PROG, CompareError, Options, parse

CSV = "compare.csv"


def _line(row: Mapping[str, Any]) -> str:
    name = str(row["monitor"]).rpartition(":")[0]
    return (
        f"{row['arm']:>18} B={row['batch_size']:<5} {row['role']:>4} seed={row['seed']:<2} "
        f"lr={row['lr']:<6} {row['setting']:<11} {name}={row['value']} "
        f"({float(row['wall_seconds']):.0f} s)" + (" DIVERGED" if row["diverged"] == "1" else "")
    )


def _status(study: Study, jobs: int) -> Callable[[Sequence[Mapping[str, Any]]], str]:
    """Where the protocol stands, for each progress line: a bar, the runs done and about how
    much time is left (the expected runs left at the mean wall time so far)."""

    def status(rows: Sequence[Mapping[str, Any]]) -> str:
        mine = [r for r in rows if r["arm"] in study.arms[study.tasks[0]]]
        expected, _ = run_count(study, rows)
        done = min(len(mine), expected)
        mean = statistics.fmean(float(r["wall_seconds"]) for r in mine) if mine else 0.0
        left = max(0, expected - done) * mean / jobs
        filled = round(20 * done / max(1, expected))
        bar = "#" * filled + "-" * (20 - filled)
        return f"[{bar}] {done}/{expected} runs, ~{left / 60:.1f} min left"

    return status


def _environment(jobs: int) -> str:
    import platform

    import lightning
    import torch

    return (
        f"torch {torch.__version__}, lightning {lightning.__version__}, Python "
        f"{platform.python_version()}, {platform.processor() or platform.machine()} "
        f"({torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}), "
        f"{jobs} run(s) in parallel"
    )


def _minutes(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def compare(options: Options, command: str) -> int:
    """Check, probe, run (or resume) and report; the number of failed runs."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from lightning_tvlars.bench.runner import read_rows, run_study
    from lightning_tvlars.compare import check, report, run

    lead = getattr(rank_zero_only, "rank", 0) == 0
    say = functools.partial(print, flush=True) if lead else (lambda *a, **k: None)
    target = options.target
    for note in options.notes:
        say(f"note: {note}")
    checked = check.check(options)
    monitor = checked.monitor
    if checked.world_size > 1 and options.jobs > 1:
        raise CompareError(
            f"--jobs={options.jobs} is invalid with a trainer of {checked.world_size} processes: "
            "expected 1 (each run already uses every device)"
        )
    configured = target.default_batch_size()
    given = options.batch_sizes or ((configured,) if configured else ())
    first = plan(options.study(given or (0,), monitor), [])[0]
    timing = check.probe(options, first)
    sizes = given or (timing.batch_size,)
    study = options.study(sizes, monitor)
    path = options.out / CSV
    try:
        rows = read_rows(path, run.FIELDS)
    except ValueError as err:
        raise CompareError(str(err)) from None
    others = {r["setup"] for r in rows} - {target.fingerprint}
    monitors = {r["monitor"] for r in rows} - {str(monitor)}
    if others or monitors:
        raise CompareError(
            f"--out {options.out}: its {CSV} holds runs of another setup ("
            + (f"setup {', '.join(sorted(others))}, not {target.fingerprint}" if others else "")
            + (f"monitor {', '.join(sorted(monitors))}, not {monitor}" if monitors else "")
            + "): model, data, trainer or budget differ; write to another --out"
        )
    model_name = target.task
    unit, amount = target.budget
    budget = f"{amount} optimizer steps per run"
    if unit == "epochs":
        budget = f"{amount} epochs per run ({timing.total_steps} optimizer steps)"
    setup = [
        f"Model: `{target.model_class}`; data: `{target.data_class or 'the model’s own loaders'}`;"
        f" setup `{target.fingerprint}` (`setup` of the rows).",
        f"Arms: {', '.join(study.arms[model_name])}; per-device batch size"
        f"{'s' if len(sizes) > 1 else ''} {', '.join(map(str, sizes))}"
        + (" (the loaders' own)" if target.batch_size_owner is None else "")
        + f"; {budget}.",
        f"Selection on the validation metric `{monitor.name}` "
        f"({'higher' if monitor.mode == 'max' else 'lower'} is better).",
        f"`{model_name}.configure_optimizers` is replaced in every run by the arm's recipe "
        "(the package's LARS or LAMB and its schedule, biases and normalization parameters "
        "neither adapted nor decayed"
        + (
            ", the module's TVLARSConfig parameter choices and weight decay kept"
            if checked.mixin
            else ""
        )
        + ").",
    ]
    for line in setup[1:]:
        say(line.replace("`", ""))
    say(
        "The runs turn off the trainer's logger, checkpoints, progress bar, model summary and "
        "sanity check; the rest of its settings is kept."
    )
    expected, at_most = run_count(study, rows)
    mine = [r for r in rows if r["arm"] in study.arms[model_name]]
    left = max(0, expected - len(mine))
    seconds = timing.run_seconds
    if mine:
        seconds = statistics.fmean(float(r["wall_seconds"]) for r in mine)
    say(
        f"{expected} runs (at most {at_most} if the learning-rate grids grow), {len(mine)} done in "
        f"{path}; the probe took {timing.step * 1e3:.3g} ms per step and "
        f"{timing.validation:.2g} s per validation: about {_minutes(seconds)} per run, "
        f"{_minutes(left * seconds / options.jobs)} for the {left} left with {options.jobs} job(s)"
        + (
            f", stopping after {options.max_minutes:g} min"
            if options.max_minutes is not None
            else ""
        )
    )
    rows, failures = run_study(
        study,
        path,
        train=functools.partial(
            run.train, target=target, monitor=monitor, sharpness=options.sharpness
        ),
        jobs=options.jobs,
        fields=run.FIELDS,
        max_minutes=options.max_minutes,
        log=say,
        line=_line,
        status=_status(study, options.jobs),
        write=lead,
    )
    if lead:
        page = report.write_report(
            study,
            [r for r in rows if r["setup"] == target.fingerprint],
            options.out,
            monitor=monitor,
            pairs=comparisons_for(study.arms[model_name]),
            command=command,
            setup=setup,
            environment=_environment(options.jobs),
            failures=failures,
        )
        say(f"report: {page}")
    return len(failures)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-tvlars compare``."""
    from lightning_tvlars.cli.main import silence_known_noise

    words = list(sys.argv[1:] if argv is None else argv)
    silence_known_noise()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    started = time.perf_counter()
    try:
        options = parse(words)
        failed = compare(options, " ".join([PROG, *words]))
    except CompareError as err:
        sys.stderr.write(f"{PROG}: error: {err}\n")
        raise SystemExit(2) from None
    if failed:
        raise SystemExit(f"{failed} run(s) failed: see the report")
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"done in {_minutes(time.perf_counter() - started)}", flush=True)
