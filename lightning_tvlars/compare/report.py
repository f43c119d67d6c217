"""The report of ``lightning-tvlars compare``: ``compare.md``, ``compare.png`` and
``compare_tuning.png`` next to the rows in ``compare.csv``, from the rows alone.

The cells, the Welch tests with Holm's correction, the paired sharpness tests and the tuning
table are the benchmark's (:mod:`lightning_tvlars.bench.report`), on the monitored metric.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from lightning_tvlars.bench import report as bench
from lightning_tvlars.bench.protocol import ARMS, Comparison, Study
from lightning_tvlars.compare.options import Monitor

Row = bench.Row
STEM = "compare"


def _num(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4g}"


def _signed(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.3g}"


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def cell_table(study: Study, cells: Sequence[bench.Cell], monitor: Monitor) -> list[str]:
    """One line per cell: the choice (its rate flagged at a grid edge), the final metric of
    the evaluation seeds with its 95% interval, and how many runs converged / diverged."""
    lines = [
        f"| batch | arm | lr (base) | setting | seeds | {monitor.name} mean ± std "
        "| 95% CI of the mean | untrained | converged | diverged |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        values = _finite(c.values("value"))
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        half = bench._ci_half(values)
        waiting = f"waits for {c.state.waiting}" if c.state.waiting else "tuning"
        lr = waiting if c.state.lr is None else f"{c.state.lr:g}"
        if bench.at_edge(study, c):
            lr += " **(grid edge)**"
        ci = "n/a" if not math.isfinite(half) else f"[{_num(mean - half)}, {_num(mean + half)}]"
        diverged = sum(int(r["diverged"]) for r in c.runs)
        lines.append(
            f"| {c.batch_size} | {c.arm} | {lr} | {c.state.setting or waiting} | {len(c.runs)} "
            f"| {_num(mean)} ± {_num(std)} | {ci} | {_num(c.mean('initial_value'))} "
            f"| {c.converged}/{len(c.runs)}{'' if c.converged == len(c.runs) else ' **!**'} "
            f"| {diverged}/{len(c.runs)} |"
        )
    return lines


def untested(
    cells: Sequence[bench.Cell], results: Sequence[bench.Result], pairs: Sequence[Comparison]
) -> list[str]:
    """The comparisons with two evaluation runs per arm that were left untested (runs without
    a finite final value)."""
    tested = {(r.batch_size, r.a, r.b) for r in results}
    by_key = {(c.batch_size, c.arm): c for c in cells}
    lines = []
    for batch_size in sorted({c.batch_size for c in cells}):
        for pair in pairs:
            both = [by_key.get((batch_size, arm)) for arm in (pair.a, pair.b)]
            if (batch_size, pair.a, pair.b) in tested or any(
                c is None or len(c.runs) < 2 for c in both
            ):
                continue
            lost = sum(
                not math.isfinite(v) for c in both if c is not None for v in c.values("value")
            )
            lines.append(
                f"- batch {batch_size}, {pair.a} − {pair.b}: not tested ({lost} diverged "
                "run(s) without a finite final value)"
            )
    return lines


def verdicts(results: Sequence[bench.Result], monitor: Monitor) -> list[str]:
    """The answer in one line per comparison."""
    better = "higher" if monitor.mode == "max" else "lower"
    lines = []
    for r in results:
        what = {"win": f"**{r.a} better**", "loss": f"**{r.b} better**"}.get(r.verdict, "tie")
        lines.append(
            f"- batch {r.batch_size}, {r.a} − {r.b}: {what} ({monitor.name} difference "
            f"{_signed(r.diff)} [{_signed(r.low)}, {_signed(r.high)}], {better} is better; "
            f"p (Holm) {bench._p(r.p_holm)})" + (f"; {r.note}" if r.note else "")
        )
    return lines


def sharpness_table(cells: Sequence[bench.Cell]) -> list[str]:
    """Per cell, the medians of the sharpness measures (end of the warm-up and of training)."""
    lines = [
        "| batch | arm | early step | early loss | early: filter-norm. | early: top eig. "
        "| end loss | end: filter-norm. | end: top eig. | end: trace |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        if c.runs:
            lines.append(
                f"| {c.batch_size} | {c.arm} | {c.median('early_step'):.0f} "
                + " ".join(
                    f"| {_num(c.median(column))}"
                    for column in (
                        "early_loss",
                        "early_filter_normalized",
                        "early_top_eigenvalue",
                        "end_loss",
                        "end_filter_normalized",
                        "end_top_eigenvalue",
                        "end_trace",
                    )
                )
                + " |"
            )
    return lines


def plot_arms(study: Study, cells: Sequence[bench.Cell], path: Path, monitor: Monitor) -> None:
    """One panel per batch size: each arm's evaluation runs (points) and their mean with its
    95% confidence interval."""
    plt = bench._pyplot()
    sizes = study.batch_sizes[study.tasks[0]]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 + 2.5 * len(sizes), 4.2), squeeze=False)
    for ax, batch_size in zip(axes[0], sizes, strict=True):
        mine = [c for c in cells if c.batch_size == batch_size]
        for i, c in enumerate(mine):
            values = _finite(c.values("value"))
            if not values:
                continue
            ax.scatter([i] * len(values), values, color=f"C{i}", alpha=0.5, s=18)
            half = bench._ci_half(values)
            ax.errorbar(
                [i + 0.15],
                [statistics.fmean(values)],
                yerr=[half if math.isfinite(half) else 0.0],
                color=f"C{i}",
                marker="o",
                capsize=4,
            )
        ax.set_xticks(range(len(mine)), [c.arm for c in mine], rotation=20, fontsize=8)
        ax.set_title(f"batch {batch_size}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"final {monitor.name} (validation): runs, mean and 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tuning(study: Study, cells: Sequence[bench.Cell], path: Path, monitor: Monitor) -> None:
    """The learning-rate search of every cell: the mean validation metric of the tuning seeds
    at each rate (the default setting), the chosen rate circled."""
    plt = bench._pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, c in enumerate(cells):
        arm = ARMS[c.arm]
        if not c.state.settings:
            continue
        points = [
            (study.lr(arm, c.task, k), c.state.scores.get((study.lr(arm, c.task, k), setting)))
            for k in c.state.grid
            for setting in (c.state.settings[0],)
        ]
        done = [(lr, v) for lr, v in points if v is not None and math.isfinite(v)]
        if not done:
            continue
        label = f"{c.arm}, B={c.batch_size}"
        ax.plot([p[0] for p in done], [p[1] for p in done], marker="o", color=f"C{i}", label=label)
        chosen = c.state.scores.get((c.state.lr, c.state.settings[0])) if c.state.lr else None
        if chosen is not None and math.isfinite(chosen):
            ax.scatter([c.state.lr], [chosen], s=160, facecolors="none", edgecolors=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate (at batch 256)")
    ax.set_ylabel(f"{monitor.name} (validation, mean of {len(study.tune_seeds)} seeds)")
    ax.set_title(
        f"Learning-rate search ({'higher' if monitor.mode == 'max' else 'lower'} is better)"
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    study: Study,
    rows: Sequence[Row],
    out: Path,
    *,
    monitor: Monitor,
    pairs: Sequence[Comparison],
    command: str,
    setup: Sequence[str],
    environment: str,
    failures: Sequence[str] = (),
) -> Path:
    """Write ``compare.md`` and its figures into ``out``; return the page's path.

    Args:
        study: the protocol that produced ``rows``.
        rows: the CSV rows (of this setup).
        monitor: the selection metric and its mode.
        pairs: the comparisons to test.
        command: the command that reproduces (and resumes) the rows.
        setup: lines describing the model, data, trainer and budget.
        environment: versions and hardware.
        failures: runs that raised (not in the CSV).
    """
    task = study.tasks[0]
    cells = bench.cells(study, rows)
    results = bench.comparisons(
        study, cells, column="value", higher_is_better=monitor.mode == "max", pairs=pairs
    )
    sharp = bench.sharpness_comparisons(study, cells, pairs=pairs)
    plot_arms(study, cells, out / f"{STEM}.png", monitor)
    plot_tuning(study, cells, out / f"{STEM}_tuning.png", monitor)
    complete = [c for c in cells if len(c.runs) == study.eval_seeds]
    versions = sorted({str(r.get("code_version", "")) for r in rows} - {""})
    wall = sum(bench._float(r["wall_seconds"]) for r in rows)
    better = "higher" if monitor.mode == "max" else "lower"
    text = [
        f"# Does TVLARS help on {task}?",
        "",
        f"Reproduce or resume: `{command}` (raw rows: `{STEM}.csv`, one per run).",
        "",
        f"Environment: {environment}. Sum of run wall times: {wall / 60:.1f} min over "
        f"{len(rows)} runs. Code: {', '.join(versions) or 'n/a'} (`code_version` of the rows).",
        "",
        *[f"- {line}" for line in setup],
        "",
        "## Answer",
        "",
        *(
            verdicts(results, monitor) + untested(cells, results, pairs)
            or ["- No comparison has two evaluation seeds per arm yet."]
        ),
        "",
        f"{len(complete)} of {len(cells)} cells complete.",
        "",
    ]
    if len(complete) < len(cells):
        resume = ": run the same command again to continue"
        text += bench.partial_results(failures, study.eval_seeds, stopped=resume)
    if failures:
        text += bench.failed_runs(failures)
    text += [
        "## Results per cell (evaluation seeds)",
        "",
        *cell_table(study, cells, monitor),
        "",
        f"## Comparisons ({monitor.name}, {better} is better)",
        "",
        *bench.comparison_table(results, task, difference=_signed, unit=f"{monitor.name}, a − b"),
        "",
    ]
    if any(math.isfinite(c.median("end_filter_normalized")) for c in cells):
        text += [
            "## Sharpness",
            "",
            *sharpness_table(cells),
            "",
            "Per seed, between the arms of each comparison (a − b):",
            "",
            *bench.paired_sharpness_table(sharp, task),
            "",
        ]
    text += [
        f"## Tuning (seeds {list(study.tune_seeds)}; chosen values in bold)",
        "",
        *bench.tuning_table(
            study, cells, task, value=_num, metric=f"{monitor.name}, {better} is better"
        ),
        "",
        "## Protocol",
        "",
        "- Every arm is an optimizer recipe (`TVLARSConfig`) that replaces the module's "
        "`configure_optimizers` in every run; everything else (model, data, trainer settings, "
        "budget) is the same for every arm.",
        f"- Tuning on the mean of the validation metric {monitor.name} over seeds "
        f"{list(study.tune_seeds)}: "
        + (
            "the explicit grid of `--lr-grid` (not extended)"
            if study.lr_points
            else f"a {2 * study.lr_steps + 1}-point learning-rate grid a quarter decade apart "
            "(x1.78), centred on LARS 1.0 / LAMB 0.01 at batch 256 (linear scaling for "
            "LARS-type arms, square root for LAMB), extended past an edge that is the best or "
            "within one standard error of it (from the tuning seeds' spread) up to "
            f"{study.max_extensions} times per side"
        )
        + f"; then the arm's second axis at the chosen rate ({study.axis_size} values for every "
        "arm: phase, warm-up length or trust coefficient).",
        f"- Evaluation: {study.eval_seeds} fresh seeds (seeds {list(study.seeds)}) per chosen "
        f"setting; the reported {monitor.name} is the final one (no best-epoch picking). The "
        "same seed gives the same initial weights and data order in every arm.",
        "- Comparisons: Welch's t-test and its 95% confidence interval for each difference, "
        "Holm's correction over every comparison on this page; a verdict other than **tie** "
        f"is a Holm-adjusted p < {bench.ALPHA}. Diverged runs leave a comparison untested.",
        f"- Converged: a run whose loss stayed finite and whose final {monitor.name} is "
        "better than the same seed's untrained model's; **!** marks cells where some did not.",
        "- **(grid edge)**: the chosen rate is the grid's first or last point, so the best may "
        "lie beyond it: "
        + (
            "widen `--lr-grid`."
            if study.lr_points
            else "the extensions ran out; give `--lr-grid` rates past it."
        ),
        "",
        "## Figures",
        "",
        f"![final {monitor.name} per arm]({STEM}.png)",
        "",
        f"![learning-rate search]({STEM}_tuning.png)",
        "",
    ]
    path = out / f"{STEM}.md"
    path.write_text("\n".join(text))
    return path
