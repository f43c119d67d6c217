"""The accuracy benchmark's report: summary per cell, Welch/Holm comparisons, sharpness, figures.

Everything is computed from the CSV rows alone (``lightning-tvlars bench --report-only``
rewrites the report of any CSV), so a partial benchmark gives a partial report: cells with
fewer than two evaluation seeds are listed without a test.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tvlars.bench.protocol import ARMS, COMPARISONS, CellState, Preset, cell_state
from lightning_tvlars.bench.stats import holm, spearman, t_quantile, welch

Row = Mapping[str, Any]
ALPHA = 0.05
TASK_TITLES = {
    "classification": "Classification (test accuracy)",
    "barlow_twins": "Barlow Twins (linear-probe test accuracy)",
}


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class Cell:
    """One cell's tuning decision and its evaluation runs."""

    task: str
    batch_size: int
    arm: str
    state: CellState
    runs: tuple[Row, ...]

    @property
    def accuracy(self) -> list[float]:
        return [_float(r["test_accuracy"]) for r in self.runs]

    def mean(self, column: str) -> float:
        values = [v for v in (_float(r[column]) for r in self.runs) if math.isfinite(v)]
        return statistics.fmean(values) if values else math.nan

    def median(self, column: str) -> float:
        values = [v for v in (_float(r[column]) for r in self.runs) if math.isfinite(v)]
        return statistics.median(values) if values else math.nan

    @property
    def converged(self) -> int:
        return sum(int(r["converged"]) for r in self.runs)


def cells(preset: Preset, rows: Sequence[Row]) -> list[Cell]:
    """Every cell of the preset with its tuning state and evaluation rows."""
    out = []
    for task in preset.tasks:
        for batch_size in preset.batch_sizes:
            for arm in preset.arms[task]:
                state = cell_state(preset, task, batch_size, ARMS[arm], rows)
                runs = tuple(
                    r
                    for r in rows
                    if (r["task"], r["arm"], int(r["batch_size"]), r["role"])
                    == (task, arm, batch_size, "eval")
                    and (_float(r["lr"]), r["setting"]) == (state.lr, state.setting)
                )
                out.append(Cell(task, batch_size, arm, state, runs))
    return out


@dataclass(frozen=True)
class Comparison:
    """``a - b`` in one (task, batch size): Welch's test, Holm-adjusted p and the verdict."""

    task: str
    batch_size: int
    a: str
    b: str
    what: str
    diff: float
    low: float
    high: float
    p: float
    p_holm: float
    verdict: str
    note: str
    n_a: int
    n_b: int


def comparisons(preset: Preset, all_cells: Sequence[Cell]) -> list[Comparison]:
    """Every comparison of :data:`COMPARISONS` with two or more seeds per side, Holm-adjusted
    over all of them; ``win`` / ``loss`` (for ``a``) only where the adjusted p < 0.05."""
    by_key = {(c.task, c.batch_size, c.arm): c for c in all_cells}
    tests = []
    for task in preset.tasks:
        for batch_size in preset.batch_sizes:
            for a, b, what in COMPARISONS:
                ca, cb = by_key.get((task, batch_size, a)), by_key.get((task, batch_size, b))
                if ca is None or cb is None or len(ca.runs) < 2 or len(cb.runs) < 2:
                    continue
                notes = [
                    f"{c.arm}: {len(c.runs) - c.converged}/{len(c.runs)} not converged"
                    for c in (ca, cb)
                    if c.converged < len(c.runs)
                ]
                tests.append((task, batch_size, a, b, what, welch(ca.accuracy, cb.accuracy), notes))
    adjusted = holm([t[5].p for t in tests])
    out = []
    for (task, batch_size, a, b, what, w, notes), p_holm in zip(tests, adjusted, strict=True):
        verdict = "tie"
        if p_holm < ALPHA:
            verdict = "win" if w.diff > 0 else "loss"
        out.append(
            Comparison(
                task,
                batch_size,
                a,
                b,
                what,
                w.diff,
                w.low,
                w.high,
                w.p,
                p_holm,
                verdict,
                "; ".join(notes),
                w.n_a,
                w.n_b,
            )
        )
    return out


def _ci_half(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    return t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def _pct(value: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.{digits}f}"


def _num(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3g}"


def _p(value: float) -> str:
    return "n/a" if not math.isfinite(value) else (f"{value:.2g}" if value >= 1e-4 else "<1e-4")


def cell_table(preset: Preset, all_cells: Sequence[Cell], task: str) -> list[str]:
    lines = [
        "| batch | arm | lr (base) | start setting | seeds | test acc. (%) mean ± std "
        "| 95% CI of the mean | train acc. (%) | converged |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in (c for c in all_cells if c.task == task):
        acc = c.accuracy
        mean = statistics.fmean(acc) if acc else math.nan
        std = statistics.stdev(acc) if len(acc) > 1 else math.nan
        half = _ci_half(acc)
        grid = c.state.grid
        edge = ""
        if c.state.lr is not None and c.state.lr in (
            preset.lr(ARMS[c.arm], task, grid[0]),
            preset.lr(ARMS[c.arm], task, grid[-1]),
        ):
            edge = " (edge)"
        lr = "tuning" if c.state.lr is None else f"{c.state.lr:g}{edge}"
        setting = c.state.setting or "tuning"
        ci = "n/a" if not math.isfinite(half) else f"[{_pct(mean - half)}, {_pct(mean + half)}]"
        lines.append(
            f"| {c.batch_size} | {c.arm} | {lr} | {setting} | {len(acc)} "
            f"| {_pct(mean)} ± {_pct(std)} "
            f"| {ci} | {_pct(c.mean('train_accuracy'))} | {c.converged}/{len(acc)} |"
        )
    return lines


def comparison_table(results: Sequence[Comparison], task: str) -> list[str]:
    lines = [
        "| batch | a − b | what it measures | seeds | difference (points) [95% CI] | p "
        "| p (Holm) | verdict for a |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in (r for r in results if r.task == task):
        verdict = f"**{r.verdict}**" if r.verdict != "tie" else "tie"
        if r.note:
            verdict += f" ({r.note})"
        lines.append(
            f"| {r.batch_size} | {r.a} − {r.b} | {r.what} | {r.n_a} + {r.n_b} "
            f"| {100 * r.diff:+.2f} [{100 * r.low:+.2f}, {100 * r.high:+.2f}] "
            f"| {_p(r.p)} | {_p(r.p_holm)} | {verdict} |"
        )
    return lines


def sharpness_table(all_cells: Sequence[Cell], task: str) -> list[str]:
    lines = [
        "| batch | arm | early step | early: filter-norm. | early: top eig. "
        "| end: filter-norm. | end: top eig. | end: trace | test acc. (%) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in (c for c in all_cells if c.task == task and c.runs):
        lines.append(
            f"| {c.batch_size} | {c.arm} | {c.median('early_step'):.0f} "
            f"| {_num(c.median('early_filter_normalized'))} "
            f"| {_num(c.median('early_top_eigenvalue'))} "
            f"| {_num(c.median('end_filter_normalized'))} | {_num(c.median('end_top_eigenvalue'))} "
            f"| {_num(c.median('end_trace'))} | {_pct(c.mean('test_accuracy'))} |"
        )
    return lines


#: Sharpness columns correlated with test accuracy, and their headings.
CORRELATED = {
    "end_filter_normalized": "end, filter-normalized",
    "end_top_eigenvalue": "end, top eigenvalue",
    "early_filter_normalized": "end of warm-up, filter-normalized",
}


def correlations(
    preset: Preset, rows: Sequence[Row], all_cells: Sequence[Cell], task: str
) -> list[tuple[str, list[tuple[float, float, int]]]]:
    """Spearman's rho (with p and n) between each :data:`CORRELATED` sharpness and test
    accuracy: within each optimizer, over every run of a cell (its tuning runs, which vary the
    learning rate and the start, and its evaluation seeds), and across optimizers, over the
    cells' medians (sharpness) and means (accuracy) of their evaluation runs."""
    out = []
    for batch_size in preset.batch_sizes:
        for arm in preset.arms[task]:
            mine = [
                r
                for r in rows
                if (r["task"], r["arm"], int(r["batch_size"])) == (task, arm, batch_size)
            ]
            accuracy = [_float(r["test_accuracy"]) for r in mine]
            out.append(
                (
                    f"within {arm}, batch {batch_size}",
                    [spearman([_float(r[m]) for r in mine], accuracy) for m in CORRELATED],
                )
            )
    evaluated = [c for c in all_cells if c.task == task and c.runs]
    accuracy = [c.mean("test_accuracy") for c in evaluated]
    out.append(
        (
            "across optimizers and batch sizes (one point per cell)",
            [spearman([c.median(m) for c in evaluated], accuracy) for m in CORRELATED],
        )
    )
    return out


def correlation_table(items: Sequence[tuple[str, list[tuple[float, float, int]]]]) -> list[str]:
    heads = " | ".join(f"rho ({name}) | p" for name in CORRELATED.values())
    lines = [
        f"| Spearman's rho with test accuracy, over | n | {heads} |",
        "|---|---:|" + "---:|---:|" * len(CORRELATED),
    ]
    for over, results in items:
        cells = " | ".join(
            f"{'n/a' if not math.isfinite(rho) else f'{rho:+.2f}'} | {_p(p)}"
            for rho, p, _ in results
        )
        lines.append(f"| {over} | {max(n for _, _, n in results)} | {cells} |")
    return lines


def tuning_table(
    preset: Preset, rows: Sequence[Row], all_cells: Sequence[Cell], task: str
) -> list[str]:
    lines = [
        "| batch | arm | lr grid (validation acc. %) "
        "| start settings at the chosen lr (validation acc. %) |",
        "|---:|---|---|---|",
    ]
    for c in (c for c in all_cells if c.task == task):
        arm = ARMS[c.arm]
        tuned = {
            (_float(r["lr"]), r["setting"]): _float(r["val_accuracy"])
            for r in rows
            if (r["task"], r["arm"], int(r["batch_size"]), r["role"])
            == (task, c.arm, c.batch_size, "tune")
        }
        grid = []
        for k in c.state.grid:
            lr = preset.lr(arm, task, k)
            value = tuned.get((lr, arm.default))
            text = f"{lr:g}: {_pct(value, 1)}" if value is not None else f"{lr:g}: …"
            grid.append(f"**{text}**" if lr == c.state.lr else text)
        axis = []
        if c.state.lr is not None:
            for s in preset.axis(arm):
                value = tuned.get((c.state.lr, s))
                text = f"{s}: {_pct(value, 1)}" if value is not None else f"{s}: …"
                axis.append(f"**{text}**" if s == c.state.setting else text)
        lines.append(f"| {c.batch_size} | {c.arm} | {', '.join(grid)} | {', '.join(axis)} |")
    return lines


# ------------------------------------------------------------------------------ figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(preset: Preset, all_cells: Sequence[Cell], path: Path) -> None:
    """Test accuracy vs batch size per arm: mean with its 95% confidence interval."""
    plt = _pyplot()
    tasks = preset.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, arm in enumerate(preset.arms[task]):
            points = [c for c in all_cells if c.task == task and c.arm == arm and len(c.runs) > 1]
            if not points:
                continue
            offset = 1 + 0.03 * (i - len(preset.arms[task]) / 2)  # keep the bars apart
            ax.errorbar(
                [c.batch_size * offset for c in points],
                [100 * statistics.fmean(c.accuracy) for c in points],
                yerr=[100 * _ci_half(c.accuracy) for c in points],
                marker="o",
                capsize=3,
                label=arm,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(preset.batch_sizes), [str(b) for b in preset.batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("test accuracy (%), mean and 95% CI")
        ax.set_title(TASK_TITLES[task])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sharpness(preset: Preset, rows: Sequence[Row], path: Path) -> None:
    """Filter-normalized sharpness (early and at the end) against test accuracy, every run."""
    plt = _pyplot()
    tasks = preset.tasks
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    markers = dict(zip(preset.batch_sizes, "osD^v<>", strict=False))
    for column, task in enumerate(tasks):
        for row_index, when in enumerate(("early", "end")):
            ax = axes[row_index][column]
            for i, arm in enumerate(preset.arms[task]):
                for batch_size in preset.batch_sizes:
                    mine = [
                        r
                        for r in rows
                        if (r["task"], r["arm"], int(r["batch_size"])) == (task, arm, batch_size)
                        and math.isfinite(_float(r[f"{when}_filter_normalized"]))
                        and _float(r[f"{when}_filter_normalized"]) > 0
                    ]
                    if not mine:
                        continue
                    ax.scatter(
                        [_float(r[f"{when}_filter_normalized"]) for r in mine],
                        [100 * _float(r["test_accuracy"]) for r in mine],
                        color=f"C{i}",
                        marker=markers[batch_size],
                        alpha=[0.9 if r["role"] == "eval" else 0.35 for r in mine],
                        s=18,
                        label=f"{arm}, B={batch_size}",
                    )
            ax.set_xscale("log")
            ax.set_xlabel(
                "filter-normalized sharpness, "
                + ("end of warm-up" if when == "early" else "end of training")
            )
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{TASK_TITLES[task]}: {when}")
            ax.grid(alpha=0.3)
            if row_index == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ the page


def write_report(
    preset: Preset,
    rows: Sequence[Row],
    out: Path,
    *,
    command: str,
    environment: str,
    failures: Sequence[str] = (),
) -> Path:
    """Write ``<stem>.md``, ``<stem>.png`` and ``<stem>_sharpness.png`` into ``out``."""
    stem = preset.stem
    all_cells = cells(preset, rows)
    results = comparisons(preset, all_cells)
    plot_accuracy(preset, all_cells, out / f"{stem}.png")
    plot_sharpness(preset, rows, out / f"{stem}_sharpness.png")
    wall = sum(_float(r["wall_seconds"]) for r in rows)
    probe = preset.probe
    complete = all(len(c.runs) == preset.eval_seeds for c in all_cells)
    data = (
        f"MNIST-1D, {preset.num_samples:,} generated samples (noise: correlated "
        f"{preset.corr_noise_scale}, iid {preset.iid_noise_scale}): "
        f"{int(0.8 * preset.num_samples) - preset.val_size:,} train, {preset.val_size:,} "
        f"validation, {preset.num_samples - int(0.8 * preset.num_samples):,} test"
    )
    text = [
        f"# Accuracy benchmark, preset `{preset.name}`",
        "",
        f"Reproduce: `{command}` (resumable: raw rows in `{stem}.csv`, one per run).",
        "",
        f"Environment: {environment}. Sum of run wall times: {wall / 60:.0f} min over "
        f"{len(rows)} runs.",
        "",
    ]
    if not complete:
        why = (
            f"{len(failures)} run(s) failed, listed below"
            if failures
            else "the run was stopped or its time budget was spent"
        )
        text += [
            f"**Partial results**: the protocol is not complete ({why}); cells with fewer than "
            f"{preset.eval_seeds} evaluation seeds are shown with what they have.",
            "",
        ]
    if failures:
        text += ["**Runs that failed** (not in the CSV):", "", *[f"- {f}" for f in failures], ""]
    text += [
        "## Protocol",
        "",
        f"- Data: {data}. Model: 1-D ResNet encoder (width {preset.width}, {preset.blocks} "
        "residual block(s)).",
        f"- Epochs: {dict(preset.epochs)}, the same for every batch size; batch sizes "
        f"{list(preset.batch_sizes)}.",
        f"- Tuning on seed {preset.tune_seed}: a {2 * preset.lr_steps + 1}-point learning-rate "
        "grid "
        f"(x1.78 steps; base rate at batch 256, linear scaling for LARS-type arms, square root "
        f"for LAMB), extended past an edge up to {preset.max_extensions} times, then "
        f"{len(preset.axis(ARMS['tvlars']))} start settings at the chosen rate (phase or "
        "warm-up length); selection on validation accuracy.",
        f"- Evaluation: {preset.eval_seeds} fresh seeds (seeds {list(preset.seeds)}) per chosen "
        "setting; test accuracy is never used for selection. The reported accuracy is the "
        "final one (no best-epoch picking).",
        "- Comparisons: Welch's t-test and its 95% confidence interval for each difference, "
        "Holm's correction over every comparison on this page; a **win** or **loss** is a "
        f"Holm-adjusted p < {ALPHA}, otherwise a tie.",
        "- Converged: final training accuracy ≥ "
        + ", ".join(
            f"{preset.converged_train_accuracy[t]:.0%} ({t.replace('_', ' ')})"
            for t in preset.tasks
        )
        + " (for Barlow Twins, the linear probe's training accuracy).",
        f"- Sharpness on a fixed batch of {probe.num_samples} training samples, model in eval "
        "mode: "
        f"top Hessian eigenvalue ({probe.iterations} power iterations at most), Hutchinson "
        f"trace ({probe.trace_samples} probes), filter-normalized random-direction loss "
        f"increase ({probe.directions} directions x 2 signs, radius 0.05); measured at the end "
        "of the warm-up (for a TVLARS arm, at the end of its paired LARS arm's warm-up: the "
        "same step) and at the end of training. Tables give medians over seeds.",
        "",
    ]
    for task in preset.tasks:
        text += [
            f"## {TASK_TITLES[task]}",
            "",
            "### Results per cell (evaluation seeds)",
            "",
            *cell_table(preset, all_cells, task),
            "",
            "### Comparisons",
            "",
            *comparison_table(results, task),
            "",
            "### Sharpness next to accuracy",
            "",
            *sharpness_table(all_cells, task),
            "",
            *correlation_table(correlations(preset, rows, all_cells, task)),
            "",
            "### Tuning (seed " + str(preset.tune_seed) + "; chosen values in bold)",
            "",
            *tuning_table(preset, rows, all_cells, task),
            "",
        ]
    text += [
        "## Figures",
        "",
        f"![test accuracy vs batch size]({stem}.png)",
        "",
        f"![sharpness vs test accuracy]({stem}_sharpness.png)",
        "",
    ]
    path = out / f"{stem}.md"
    path.write_text("\n".join(text))
    return path
