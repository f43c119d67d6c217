"""The accuracy benchmark's report: summary per cell, Welch/Holm comparisons, sharpness, figures.

Everything is computed from the CSV rows alone (``lightning-tvlars bench --report-only``
rewrites the report of any CSV), so a partial benchmark gives a partial report: cells with
fewer than two evaluation seeds are listed without a test. The cells, the comparisons, the
grid-edge check and the tuning table take the metric as a parameter: ``lightning-tvlars
compare`` (:mod:`lightning_tvlars.compare.report`) builds its page from them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tvlars.bench.protocol import (
    ARMS,
    COMPARISONS,
    CellState,
    Comparison,
    Preset,
    Study,
    cell_state,
)
from lightning_tvlars.bench.stats import Paired, holm, paired, spearman, t_quantile, welch

Row = Mapping[str, Any]
ALPHA = 0.05
TASK_TITLES = {
    "classification": "Classification (test accuracy)",
    "barlow_twins": "Barlow Twins (linear-probe test accuracy)",
    "deep_classification": "Classification with the deeper ResNet (test accuracy)",
}
#: The loss of a uniform prediction over MNIST-1D's 10 classes: an early probe above it
#: measures a model worse than chance.
CHANCE_LOSS = {"classification": math.log(10), "deep_classification": math.log(10)}


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
        return self.values("test_accuracy")

    def values(self, column: str) -> list[float]:
        """The evaluation runs' ``column``, in the order of the rows."""
        return [_float(r[column]) for r in self.runs]

    def mean(self, column: str) -> float:
        values = [v for v in (_float(r[column]) for r in self.runs) if math.isfinite(v)]
        return statistics.fmean(values) if values else math.nan

    def median(self, column: str) -> float:
        values = [v for v in (_float(r[column]) for r in self.runs) if math.isfinite(v)]
        return statistics.median(values) if values else math.nan

    @property
    def converged(self) -> int:
        return sum(int(r["converged"]) for r in self.runs)

    def by_seed(self, column: str) -> dict[int, float]:
        return {int(r["seed"]): _float(r[column]) for r in self.runs}


def cells(preset: Study, rows: Sequence[Row]) -> list[Cell]:
    """Every cell of the study with its tuning state and evaluation rows."""
    out = []
    for task in preset.tasks:
        for batch_size in preset.batch_sizes[task]:
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
class Result:
    """``a - b`` in one (task, batch size): Welch's test, Holm-adjusted p and the verdict."""

    task: str
    batch_size: int
    a: str
    b: str
    isolates: str
    diff: float
    low: float
    high: float
    p: float
    p_holm: float
    verdict: str
    note: str
    n_a: int
    n_b: int


def _pairs(
    by_key: Mapping[tuple[str, int, str], Cell],
    task: str,
    batch_size: int,
    pairs: Sequence[Comparison] = COMPARISONS,
) -> list[Any]:
    """The comparisons of ``pairs`` whose two cells both exist in (task, batch size)."""
    out = []
    for comparison in pairs:
        ca = by_key.get((task, batch_size, comparison.a))
        cb = by_key.get((task, batch_size, comparison.b))
        if ca is not None and cb is not None:
            out.append((comparison, ca, cb))
    return out


def comparisons(
    preset: Study,
    all_cells: Sequence[Cell],
    *,
    column: str = "test_accuracy",
    higher_is_better: bool = True,
    pairs: Sequence[Comparison] = COMPARISONS,
) -> list[Result]:
    """Every comparison of ``pairs`` with two or more seeds per side on ``column``,
    Holm-adjusted over all of them; ``win`` / ``loss`` (for ``a``) only where the adjusted
    p < 0.05 (a win is a larger ``a`` when ``higher_is_better``, a smaller one otherwise)."""
    by_key = {(c.task, c.batch_size, c.arm): c for c in all_cells}
    tests = []
    for task in preset.tasks:
        for batch_size in preset.batch_sizes[task]:
            for comparison, ca, cb in _pairs(by_key, task, batch_size, pairs):
                if len(ca.runs) < 2 or len(cb.runs) < 2:
                    continue
                values = ca.values(column) + cb.values(column)
                if not all(math.isfinite(v) for v in values):  # diverged runs: no test
                    continue
                notes = [
                    f"{c.arm}: {len(c.runs) - c.converged}/{len(c.runs)} not converged"
                    for c in (ca, cb)
                    if c.converged < len(c.runs)
                ]
                result = welch(ca.values(column), cb.values(column))
                tests.append((task, batch_size, comparison, result, notes))
    adjusted = holm([t[3].p for t in tests])
    out = []
    for (task, batch_size, comparison, w, notes), p_holm in zip(tests, adjusted, strict=True):
        verdict = "tie"
        if p_holm < ALPHA:
            verdict = "win" if (w.diff > 0) == higher_is_better else "loss"
        out.append(
            Result(
                task,
                batch_size,
                comparison.a,
                comparison.b,
                comparison.isolates,
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


#: Sharpness columns compared per seed between arms, and their headings.
PAIRED_MEASURES = {
    "early_filter_normalized": "early, filter-norm.",
    "early_top_eigenvalue": "early, top eig.",
    "end_filter_normalized": "end, filter-norm.",
    "end_top_eigenvalue": "end, top eig.",
}


@dataclass(frozen=True)
class SharpnessResult:
    """Per-seed differences of one sharpness measure between two arms' evaluation runs."""

    task: str
    batch_size: int
    a: str
    b: str
    measure: str
    test: Paired
    p_holm: float


def sharpness_comparisons(
    preset: Study, all_cells: Sequence[Cell], *, pairs: Sequence[Comparison] = COMPARISONS
) -> list[SharpnessResult]:
    """Paired tests (same seed: same initial weights and batch order) of each
    :data:`PAIRED_MEASURES` for every comparison of ``pairs`` with at least two common seeds;
    Holm over all of them (a family of its own)."""
    by_key = {(c.task, c.batch_size, c.arm): c for c in all_cells}
    tests = []
    for task in preset.tasks:
        for batch_size in preset.batch_sizes[task]:
            for comparison, ca, cb in _pairs(by_key, task, batch_size, pairs):
                for measure in PAIRED_MEASURES:
                    va, vb = ca.by_seed(measure), cb.by_seed(measure)
                    seeds = sorted(set(va) & set(vb))
                    if len(seeds) < 2:
                        continue
                    test = paired([va[s] for s in seeds], [vb[s] for s in seeds])
                    tests.append((task, batch_size, comparison, measure, test))
    adjusted = holm([t[4].p_wilcoxon for t in tests])
    return [
        SharpnessResult(task, batch_size, c.a, c.b, measure, test, p_holm)
        for (task, batch_size, c, measure, test), p_holm in zip(tests, adjusted, strict=True)
    ]


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


def at_edge(study: Study, cell: Cell) -> bool:
    """Whether the cell's chosen learning rate is the first or last point of its grid (the
    best may lie beyond it)."""
    grid, lr = cell.state.grid, cell.state.lr
    arm = ARMS[cell.arm]
    return lr is not None and lr in (
        study.lr(arm, cell.task, grid[0]),
        study.lr(arm, cell.task, grid[-1]),
    )


def cell_table(preset: Preset, all_cells: Sequence[Cell], task: str) -> list[str]:
    lines = [
        "| batch | arm | lr (base) | setting | seeds | test acc. (%) mean ± std "
        "| 95% CI of the mean | train acc. (%) | converged |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in (c for c in all_cells if c.task == task):
        acc = c.accuracy
        mean = statistics.fmean(acc) if acc else math.nan
        std = statistics.stdev(acc) if len(acc) > 1 else math.nan
        half = _ci_half(acc)
        edge = " (edge)" if at_edge(preset, c) else ""
        waiting = f"waits for {c.state.waiting}" if c.state.waiting else "tuning"
        lr = waiting if c.state.lr is None else f"{c.state.lr:g}{edge}"
        setting = c.state.setting or waiting
        ci = "n/a" if not math.isfinite(half) else f"[{_pct(mean - half)}, {_pct(mean + half)}]"
        lines.append(
            f"| {c.batch_size} | {c.arm} | {lr} | {setting} | {len(acc)} "
            f"| {_pct(mean)} ± {_pct(std)} "
            f"| {ci} | {_pct(c.mean('train_accuracy'))} | {c.converged}/{len(acc)} |"
        )
    return lines


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def comparison_table(
    results: Sequence[Result],
    task: str,
    *,
    difference: Callable[[float], str] = _points,
    unit: str = "points",
) -> list[str]:
    """The comparisons of ``task``; ``difference`` writes a difference in ``unit``."""
    lines = [
        f"| batch | a − b | what the difference isolates | seeds | difference ({unit}) [95% CI] "
        "| p | p (Holm) | verdict for a |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in (r for r in results if r.task == task):
        verdict = f"**{r.verdict}**" if r.verdict != "tie" else "tie"
        if r.note:
            verdict += f" ({r.note})"
        lines.append(
            f"| {r.batch_size} | {r.a} − {r.b} | {r.isolates} | {r.n_a} + {r.n_b} "
            f"| {difference(r.diff)} [{difference(r.low)}, {difference(r.high)}] "
            f"| {_p(r.p)} | {_p(r.p_holm)} | {verdict} |"
        )
    return lines


def _above_chance(c: Cell) -> str:
    chance = CHANCE_LOSS.get(c.task)
    if chance is None:
        return "n/a"
    losses = [v for v in (_float(r["early_loss"]) for r in c.runs) if math.isfinite(v)]
    return f"{sum(v > chance for v in losses)}/{len(losses)}"


def sharpness_table(all_cells: Sequence[Cell], task: str) -> list[str]:
    lines = [
        "| batch | arm | early step | early loss | early loss > chance | early: filter-norm. "
        "| early: top eig. | end loss | end: filter-norm. | end: top eig. | end: trace "
        "| test acc. (%) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in (c for c in all_cells if c.task == task and c.runs):
        lines.append(
            f"| {c.batch_size} | {c.arm} | {c.median('early_step'):.0f} "
            f"| {_num(c.median('early_loss'))} | {_above_chance(c)} "
            f"| {_num(c.median('early_filter_normalized'))} "
            f"| {_num(c.median('early_top_eigenvalue'))} | {_num(c.median('end_loss'))} "
            f"| {_num(c.median('end_filter_normalized'))} | {_num(c.median('end_top_eigenvalue'))} "
            f"| {_num(c.median('end_trace'))} | {_pct(c.mean('test_accuracy'))} |"
        )
    return lines


def paired_sharpness_table(results: Sequence[SharpnessResult], task: str) -> list[str]:
    lines = [
        "| batch | a − b | measure | pairs | a < b | a > b | median a − b | p (Wilcoxon) "
        "| p (sign) | p (Holm) | |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in (r for r in results if r.task == task):
        t = r.test
        verdict = ""
        if r.p_holm < ALPHA:
            verdict = "**a flatter**" if t.median < 0 else "**a sharper**"
        lines.append(
            f"| {r.batch_size} | {r.a} − {r.b} | {PAIRED_MEASURES[r.measure]} | {t.n} "
            f"| {t.below} | {t.above} | {_num(t.median)} | {_p(t.p_wilcoxon)} | {_p(t.p_sign)} "
            f"| {_p(r.p_holm)} | {verdict} |"
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
    for batch_size in preset.batch_sizes[task]:
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


def _pct1(value: float) -> str:
    return _pct(value, 1)


def tuning_table(
    preset: Study,
    all_cells: Sequence[Cell],
    task: str,
    *,
    value: Callable[[float], str] = _pct1,
    metric: str = "validation acc. %",
) -> list[str]:
    """The tuning points of ``task``'s cells: the grid, then the settings at the chosen rate,
    each with its mean ``metric`` over the tuning seeds (written by ``value``)."""
    seeds = len(preset.tune_seeds)
    lines = [
        f"| batch | arm | lr grid ({metric}, mean of {seeds} seeds) "
        f"| settings at the chosen lr ({metric}) |",
        "|---:|---|---|---|",
    ]
    for c in (c for c in all_cells if c.task == task):
        arm, state = ARMS[c.arm], c.state
        if state.waiting:
            lines.append(f"| {c.batch_size} | {c.arm} | waits for {state.waiting} | |")
            continue
        grid = []
        for k in state.grid:
            lr = preset.lr(arm, task, k)
            score = state.scores.get((lr, state.settings[0]))
            text = f"{lr:g}: {value(score)}" if score is not None else f"{lr:g}: …"
            grid.append(f"**{text}**" if lr == state.lr else text)
        axis = []
        if state.lr is not None:
            for setting in state.settings:
                score = state.scores.get((state.lr, setting))
                text = f"{setting}: {value(score)}" if score is not None else f"{setting}: …"
                axis.append(f"**{text}**" if setting == state.setting else text)
        lines.append(f"| {c.batch_size} | {c.arm} | {', '.join(grid)} | {', '.join(axis)} |")
    return lines


def completeness(preset: Preset, all_cells: Sequence[Cell]) -> list[str]:
    """One line per task: the cells with every evaluation seed, and where the others stand."""
    lines = []
    for task in preset.tasks:
        mine = [c for c in all_cells if c.task == task]
        done = [c for c in mine if len(c.runs) == preset.eval_seeds]
        rest = [
            f"{c.arm} at {c.batch_size} ("
            + (
                f"{len(c.runs)}/{preset.eval_seeds} seeds"
                if c.state.setting
                else f"waits for {c.state.waiting}"
                if c.state.waiting
                else "tuning"
            )
            + ")"
            for c in mine
            if c not in done
        ]
        line = f"- {TASK_TITLES[task]}: {len(done)} of {len(mine)} cells complete"
        lines.append(line + (f"; not yet: {', '.join(rest)}." if rest else "."))
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
        sizes = preset.batch_sizes[task]
        ax.set_xticks(list(sizes), [str(b) for b in sizes])
        ax.set_xlim(min(sizes) / 1.25, max(sizes) * 1.25)  # room for the offset bars
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
    sizes = sorted({b for t in tasks for b in preset.batch_sizes[t]})
    markers = dict(zip(sizes, "osD^v<>", strict=False))
    for column, task in enumerate(tasks):
        for row_index, when in enumerate(("early", "end")):
            ax = axes[row_index][column]
            for i, arm in enumerate(preset.arms[task]):
                for batch_size in preset.batch_sizes[task]:
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


def partial_results(failures: Sequence[str], eval_seeds: int, stopped: str = "") -> list[str]:
    """The report's paragraph for a protocol that is not complete: why (runs that failed, or
    the run was stopped; ``stopped`` adds what to do), and how its cells are shown."""
    why = (
        f"{len(failures)} run(s) failed, listed below"
        if failures
        else f"the run was stopped or its time budget was spent{stopped}"
    )
    return [
        f"**Partial results**: the protocol is not complete ({why}); cells with fewer than "
        f"{eval_seeds} evaluation seeds are shown with what they have.",
        "",
    ]


def failed_runs(failures: Sequence[str]) -> list[str]:
    """The report's list of the runs that failed (they have no row in the CSV)."""
    return ["**Runs that failed** (not in the CSV):", "", *[f"- {f}" for f in failures], ""]


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
    sharpness_results = sharpness_comparisons(preset, all_cells)
    plot_accuracy(preset, all_cells, out / f"{stem}.png")
    plot_sharpness(preset, rows, out / f"{stem}_sharpness.png")
    wall = sum(_float(r["wall_seconds"]) for r in rows)
    probe = preset.probe
    complete = all(len(c.runs) == preset.eval_seeds for c in all_cells)
    versions = sorted({str(r.get("code_version", "")) for r in rows} - {""})
    data = (
        f"MNIST-1D, {preset.num_samples:,} generated samples (noise: correlated "
        f"{preset.corr_noise_scale}, iid {preset.iid_noise_scale}): "
        f"{int(0.8 * preset.num_samples) - preset.val_size:,} train, {preset.val_size:,} "
        f"validation, {preset.num_samples - int(0.8 * preset.num_samples):,} test"
    )
    params = {
        task: sorted({int(r["model_params"]) for r in rows if r["task"] == task})
        for task in preset.tasks
    }
    models = "; ".join(
        f"{task.replace('_', ' ')}: width {preset.models[task].width}, "
        f"{preset.models[task].blocks} residual block(s)"
        + (f", {', '.join(f'{n:,}' for n in params[task])} parameters" if params[task] else "")
        + (f", projector {preset.projection_dim}" if task == "barlow_twins" else "")
        for task in preset.tasks
    )
    seeds = list(preset.tune_seeds)
    text = [
        f"# Accuracy benchmark, preset `{preset.name}`",
        "",
        f"Reproduce: `{command}` (resumable: raw rows in `{stem}.csv`, one per run).",
        "",
        f"Environment of the process that wrote this report: {environment}. Sum of run wall "
        f"times: {wall / 60:.0f} min over {len(rows)} runs. Code of the runs: "
        f"{', '.join(versions) or 'n/a'} (`code_version` of the rows).",
        "",
        "## Completeness",
        "",
        *completeness(preset, all_cells),
        "",
    ]
    if not complete:
        text += partial_results(failures, preset.eval_seeds)
    if failures:
        text += failed_runs(failures)
    text += [
        "## Protocol",
        "",
        f"- Data: {data}. Models (1-D ResNets): {models}.",
        f"- Epochs: {dict(preset.epochs)}, the same for every batch size; batch sizes "
        f"{ {t: list(preset.batch_sizes[t]) for t in preset.tasks} }.",
        f"- Tuning on the mean validation accuracy of seeds {seeds}: a "
        f"{2 * preset.lr_steps + 1}-point learning-rate grid (x1.78 steps; base rate at batch "
        "256, linear scaling for LARS-type arms, square root for LAMB), extended past an edge "
        "that is the best or within one standard error of the best (binomial, over the "
        f"validation samples of both means), up to {preset.max_extensions} times per side; "
        "then the arm's second axis at the chosen rate (phase, warm-up length, or the trust "
        "coefficient for plain LARS), "
        f"{len(preset.axis(ARMS['tvlars']))} values for every arm. `lars-warmup-phase` takes "
        "the phase chosen for `tvlars` and tunes its warm-up.",
        f"- Evaluation: {preset.eval_seeds} fresh seeds (seeds {list(preset.seeds)}) per chosen "
        "setting; test accuracy is never used for selection. The reported accuracy is the "
        "final one (no best-epoch picking). The same seed gives the same initial weights and "
        "batch order in every arm.",
        "- Comparisons: Welch's t-test and its 95% confidence interval for each difference, "
        "Holm's correction over every comparison on this page; a **win** or **loss** is a "
        f"Holm-adjusted p < {ALPHA}, otherwise a tie. Each is named by what it isolates: what "
        "the two arms do differently.",
        "- Converged: final training accuracy ≥ "
        + ", ".join(
            f"{preset.converged_train_accuracy[t]:.0%} ({t.replace('_', ' ')})"
            for t in preset.tasks
        )
        + " (for Barlow Twins, the linear probe's training accuracy).",
        f"- Sharpness on a fixed batch of {probe.num_samples} training samples, Dropout off and "
        "BatchNorm on that batch's statistics (the loss the optimizer sees; running statistics "
        "untouched): "
        f"top Hessian eigenvalue ({probe.iterations} power iterations at most), Hutchinson "
        f"trace ({probe.trace_samples} probes), filter-normalized random-direction loss "
        f"increase ({probe.directions} directions x 2 signs, radius 0.05); measured at the end "
        "of the warm-up (for an arm without warm-up, at the end of its paired arm's warm-up: "
        "the same step) and at the end of training, with the probe batch's loss next to it "
        "(chance: ln 10 = 2.30). Per-cell tables give medians; arms are compared per seed "
        "(Wilcoxon's signed-rank test and the sign test, Holm over the sharpness tests).",
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
            "Per seed, between the arms of each comparison (a − b):",
            "",
            *paired_sharpness_table(sharpness_results, task),
            "",
            *correlation_table(correlations(preset, rows, all_cells, task)),
            "",
            f"### Tuning (seeds {seeds}; chosen values in bold)",
            "",
            *tuning_table(preset, all_cells, task),
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
