"""``lightning-tvlars plot LOGDIR``: draw a run's TVLARS metrics to one PNG.

Reads what :class:`~lightning_tvlars.TVLARSMonitor` logged, from the ``metrics.csv`` of a
``CSVLogger`` or the ``events.out.tfevents.*`` files of a ``TensorBoardLogger``, and draws::

    phase phi(t)                    | learning rate
    trust ratio r: median, min-max  | effective step lr x phi x median r
    [sharpness]                     | [loss / accuracy]      (when logged)
    per-layer trust ratio curves (log y)
    layer x step heatmap of log10 r (rows in layer order, see below)

``LOGDIR`` is a run directory (``lightning_logs/version_3``), a directory above runs
(``lightning_logs``: the newest run is drawn), or the log file itself. In a directory holding
both kinds of log, ``metrics.csv`` is read. Lightning's ``CSVLogger`` sorts its columns, so
layers read from a CSV are in natural order of their names (``net.2`` before ``net.10``);
TensorBoard keeps the order in which the monitor logged them, which is the model's. For
example::

    lightning-tvlars plot lightning_logs                 # -> lightning_logs/version_N/tvlars.png
    lightning-tvlars plot lightning_logs/version_3 --layers 'encoder' --out encoder.png
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_tvlars._validation import OneLineArgumentParser, int_argument

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: name -> [(step, value), ...], sorted by step, one value per step (the last one logged).
Metrics = dict[str, list[tuple[int, float]]]

CSV_NAME = "metrics.csv"
EVENTS_GLOB = "events.out.tfevents.*"
#: How far below LOGDIR runs are looked for (``root/lightning_logs/version_0`` is 2).
SEARCH_DEPTH = 4
#: The per-layer family drawn by default: ``<prefix>/trust_ratio/<name>``.
DEFAULT_METRIC = "trust_ratio"
DEFAULT_MAX_LAYERS = 40
DEFAULT_DPI = 120
#: Per-layer curves get a legend up to this many layers, else a colour by depth.
LEGEND_MAX_LAYERS = 10
FIGURE_WIDTH = 12.0
#: Series of at most this many points are drawn with dots on the line.
MARKERS_UP_TO = 30

_TVLARS_NAME = re.compile(r"^tvlars(_\d+)?/")
_NOT_PER_LAYER = {"sharpness"}  # <prefix>/sharpness/<what> are whole-model quantities


# ---------------------------------------------------------------------------- finding logs


def _natural(text: str) -> list[Any]:
    """Sort key comparing runs of digits as numbers: ``net.2`` < ``net.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _log_in(directory: Path) -> Path | None:
    """The log of a run directory: its ``metrics.csv``, else itself if it holds event files."""
    if (directory / CSV_NAME).is_file():
        return directory / CSV_NAME
    if any(p.is_file() for p in directory.glob(EVENTS_GLOB)):
        return directory
    return None


def _runs_below(directory: Path, depth: int) -> list[Path]:
    log = _log_in(directory)
    if log is not None:
        return [log]  # a run directory: its subdirectories (checkpoints, ...) are not runs
    if depth == 0:
        return []
    try:
        children = sorted(p for p in directory.iterdir() if p.is_dir())
    except OSError:  # unreadable: not a run
        return []
    return [run for child in children for run in _runs_below(child, depth - 1)]


def _age(log: Path) -> tuple[float, int, list[Any]]:
    """Sort key: last write, then the N of ``version_N`` (coarse clocks tie), then the name."""
    files = [log] if log.is_file() else [p for p in log.glob(EVENTS_GLOB) if p.is_file()]
    run = log if log.is_dir() else log.parent
    version = re.fullmatch(r"version_(\d+)", run.name)
    return (
        max(p.stat().st_mtime for p in files),
        int(version[1]) if version else -1,
        _natural(str(log)),
    )


def find_logs(path: str | Path) -> list[Path]:
    """The logs at or below ``path``, oldest first; the last is the newest.

    Each log is a ``metrics.csv`` file, a TensorBoard event file, or a directory holding event
    files. ``path`` is such a file, a run directory, or a directory up to ``SEARCH_DEPTH``
    levels above runs. Newest means last written (the newest file of a run), then the higher
    ``version_N``. A directory holding both kinds of log counts once, as its ``metrics.csv``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no log there (the message names the path and what was expected).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".csv" or "tfevents" in path.name:
            return [path]
        raise ValueError(
            f"{path}: not a log file; expected a CSVLogger {CSV_NAME} or a TensorBoard "
            f"{EVENTS_GLOB} file (or a directory holding them)"
        )
    runs = _runs_below(path, SEARCH_DEPTH)
    if not runs:
        empty = [p.parent for p in path.glob("**/hparams.yaml")]
        hint = (
            f" ({empty[0]} is a Lightning run that logged no metrics: a run "
            "shorter than the trainer's log_every_n_steps logs none)"
            if empty
            else ""
        )
        raise ValueError(
            f"{path}: no {CSV_NAME} or TensorBoard {EVENTS_GLOB} file in it or up to "
            f"{SEARCH_DEPTH} levels below; expected a Lightning log directory (e.g. "
            "lightning_logs/version_0), a directory above such runs, or the log file itself"
            f"{hint}"
        )
    return sorted(runs, key=_age)


# ---------------------------------------------------------------------------- reading logs


def _number(text: object) -> float | None:
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _read_csv(path: Path) -> Metrics:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        fields = list(reader.fieldnames or [])
        if "step" not in fields:
            found = ", ".join(fields[:8]) if fields else "the file is empty"
            raise ValueError(
                f"{path}: no 'step' column ({found}); expected the {CSV_NAME} of Lightning's "
                "CSVLogger"
            )
        # The CSVLogger sorts its header: natural order puts net.2 before net.10.
        points: dict[str, dict[int, float]] = {
            name: {} for name in sorted((f for f in fields if f != "step"), key=_natural)
        }
        for row in reader:
            step = _number(row.get("step"))
            if step is None or not math.isfinite(step):
                continue
            for name, cell in row.items():
                value = _number(cell)  # sparse rows: empty cells are skipped
                if name in points and value is not None:
                    points[name][int(step)] = value  # a repeated step keeps the last value
    return {name: sorted(p.items()) for name, p in points.items() if p}


def _read_tensorboard(path: Path) -> Metrics:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise ImportError(
            f"{path} is a TensorBoard log; reading it needs the tensorboard package "
            f"(pip install tensorboard), or plot the CSVLogger's {CSV_NAME} instead"
        ) from err
    # 0 keeps every scalar (the default samples 10,000); of the rest keep as little as possible.
    guidance = {
        "scalars": 0,
        "histograms": 1,
        "compressedHistograms": 1,
        "images": 1,
        "audio": 1,
        "tensors": 1,
    }
    events = EventAccumulator(str(path), size_guidance=guidance).Reload()
    metrics: Metrics = {}
    for tag in events.Tags().get("scalars", []):  # in the order first logged: model order
        points = {int(e.step): float(e.value) for e in events.Scalars(tag)}
        if points:
            metrics[tag] = sorted(points.items())
    return metrics


def load_metrics(path: str | Path) -> Metrics:
    """Every scalar of a run's log as ``{name: [(step, value), ...]}``.

    ``path`` is a ``metrics.csv``, a TensorBoard event file, or a directory (the newest log at
    or below it is read, see :func:`find_logs`). Series are sorted by step with one value per
    step (the last logged); empty CSV cells and non-numeric values are skipped. Names keep the
    log's order (TensorBoard) or natural order (CSV, whose header Lightning sorts).
    """
    log = find_logs(path)[-1]
    if log.suffix == ".csv":
        return _read_csv(log)
    return _read_tensorboard(log)


# ---------------------------------------------------------------------------- drawing


def _positive(series: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in series if math.isfinite(v) and v > 0]
    return [s for s, _ in kept], [v for _, v in kept]


def _finite(series: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in series if math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def _joined(*series: Sequence[tuple[int, float]]) -> tuple[list[int], list[list[float]]]:
    """Steps present in every series, and each series' values at those steps."""
    maps = [dict(s) for s in series]
    steps = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
    return steps, [[m[s] for s in steps] for m in maps]


def _line(ax: Axes, xy: tuple[list[int], list[float]], *fmt: str, **kwargs: Any) -> list[Any]:
    """``ax.plot`` with dots when there are few points (a lone point has no line to show)."""
    if len(xy[0]) <= MARKERS_UP_TO:
        kwargs = {"marker": "o", "markersize": 3, **kwargs}
    return ax.plot(*xy, *fmt, **kwargs)


def _note(ax: Axes, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", wrap=True, color="0.4", transform=ax.transAxes
    )
    ax.set_yticks([])


def _log_y(ax: Axes, values: Sequence[float]) -> None:
    if values and min(values) > 0:
        ax.set_yscale("log")
    elif values:
        ax.set_yscale("symlog")


def _missing_prefix(metrics: Mapping[str, object], prefix: str, source: str) -> str:
    heads = sorted({name.split("/")[0] for name in metrics if "/" in name})
    others = [h for h in heads if _TVLARS_NAME.match(h + "/") and h != prefix]
    hint = f"; did you mean --prefix {others[0]}?" if others else ""
    found = ", ".join(heads) if heads else ", ".join(list(metrics)[:8]) or "no metrics at all"
    return (
        f"{source}: no TVLARS metrics named '{prefix}/...' (expected those of TVLARSMonitor, "
        f"e.g. {prefix}/phase, {prefix}/lr, {prefix}/trust_ratio/<layer>); found: {found}{hint}"
    )


def per_layer(metrics: Mapping[str, list[tuple[int, float]]], prefix: str, family: str) -> Metrics:
    """``{layer: series}`` of the metrics named ``<prefix>/<family>/<layer>``, in log order."""
    head = f"{prefix}/{family}/"
    return {name[len(head) :]: s for name, s in metrics.items() if name.startswith(head) and s}


def _families(metrics: Mapping[str, object], prefix: str) -> list[str]:
    parts = (name.split("/") for name in metrics if name.startswith(f"{prefix}/"))
    found = {p[1] for p in parts if len(p) > 2 and p[1] not in _NOT_PER_LAYER}
    return sorted(found)


def _subsample(names: list[str], most: int) -> list[str]:
    """At most ``most`` names, evenly spread over the list, first and last included."""
    if len(names) <= most:
        return names
    if most == 1:
        return names[:1]
    picks = sorted({round(i * (len(names) - 1) / (most - 1)) for i in range(most)})
    return [names[i] for i in picks]


def _edges(steps: Sequence[int]) -> list[float]:
    """Cell edges halfway between logged steps (the intervals may be uneven)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in pairwise(steps)]
    return [2 * steps[0] - mids[0], *mids, 2 * steps[-1] - mids[-1]]


def _training_metrics(metrics: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """Loss-like and accuracy-like metrics logged next to the monitor's (at most 6 each)."""
    other = [n for n in metrics if not _TVLARS_NAME.match(n)]
    losses = [n for n in other if "loss" in n.lower()]
    accuracies = [n for n in other if "acc" in n.lower() and n not in losses]
    return losses[:6], accuracies[:6]


def plot_metrics(
    metrics: Mapping[str, list[tuple[int, float]]],
    prefix: str = "tvlars",
    *,
    source: str = "metrics",
    layers: str | re.Pattern[str] | None = None,
    max_layers: int = DEFAULT_MAX_LAYERS,
    metric: str = DEFAULT_METRIC,
) -> Figure:
    """The figure of :func:`plot_run` from already loaded metrics (see :func:`load_metrics`).

    Args:
        metrics: ``{name: [(step, value), ...]}``.
        prefix: the monitor's prefix: ``tvlars`` for the first TVLARS optimizer, ``tvlars_1``...
        source: where the metrics come from, for the title and error messages.
        layers: a regular expression; only matching layer names get curves and heatmap rows.
        max_layers: the heatmap shows at most this many layers, evenly spread over the model.
        metric: the per-layer family of the curves and heatmap (``lnr``, ``grad_norm``...).

    Raises:
        ValueError: no ``<prefix>/...`` metric, ``layers`` matches no layer, or ``metric`` is
            not a per-layer family of the log.
    """
    try:
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("lightning-tvlars plot needs matplotlib: pip install matplotlib") from err

    if max_layers < 1:
        raise ValueError(f"max_layers={max_layers} is invalid: expected a positive integer")
    if not any(name.startswith(f"{prefix}/") for name in metrics):
        raise ValueError(_missing_prefix(metrics, prefix, source))
    layer_series = per_layer(metrics, prefix, metric)
    if not layer_series and metric != DEFAULT_METRIC:
        families = ", ".join(_families(metrics, prefix)) or "none"
        raise ValueError(
            f"{source}: no per-layer metrics named '{prefix}/{metric}/<layer>'; per-layer "
            f"families in this log: {families}"
        )
    if layers is not None and layer_series:
        pattern = re.compile(layers) if isinstance(layers, str) else layers
        kept = {n: s for n, s in layer_series.items() if pattern.search(n)}
        if not kept:
            names = list(layer_series)
            listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"{source}: --layers {pattern.pattern!r} matches none of the {len(names)} "
                f"layers with '{prefix}/{metric}/<layer>' metrics: {listed}"
            )
        layer_series = kept

    def get(name: str) -> list[tuple[int, float]]:
        return list(metrics.get(f"{prefix}/{name}", []))

    phase, lr, skipped = get("phase"), get("lr"), get("skipped")
    r_min, r_med, r_max = get("trust_ratio_min"), get("trust_ratio_median"), get("trust_ratio_max")
    sharpness = per_layer(metrics, prefix, "sharpness")
    losses, accuracies = _training_metrics(metrics)

    def draw_phase(ax: Axes) -> None:
        ax.set_title(f"phase phi(t)   [{prefix}/phase]")
        if not phase:
            return _note(ax, f"no {prefix}/phase in this log")
        _line(ax, _finite(phase), color="C0")
        bad = [s for s, v in skipped if v > 0]
        if bad:
            at = dict(phase)
            ax.plot(
                bad, [at.get(s, 0.0) for s in bad], "x", color="C3", label="skipped (non-finite)"
            )
            ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)

    def draw_lr(ax: Axes) -> None:
        ax.set_title(f"learning rate   [{prefix}/lr]")
        if not lr:
            return _note(ax, f"no {prefix}/lr in this log")
        steps, values = _finite(lr)
        _line(ax, (steps, values), color="C1")
        if values and min(values) > 0 and max(values) > 100 * min(values):
            ax.set_yscale("log")

    def draw_summary(ax: Axes) -> None:
        ax.set_title("trust ratio r of adapted tensors: median, min-max band")
        steps, (lows, mids, highs) = _joined(r_min, r_med, r_max)
        if not steps:
            if r_med:
                _line(ax, _positive(r_med), color="C2", label="median")
                return _log_y(ax, _positive(r_med)[1])
            return _note(ax, f"no {prefix}/trust_ratio_{{min,median,max}} in this log")
        ax.fill_between(steps, lows, highs, color="C2", alpha=0.25, lw=0, label="min-max")
        _line(ax, (steps, mids), color="C2", label="median")
        _log_y(ax, [v for v in lows + mids + highs if math.isfinite(v)])
        ax.legend(fontsize=7)

    def draw_effective(ax: Axes) -> None:
        ax.set_title("effective step lr x phi x median r")
        steps, (a, b, c) = _joined(lr, phase, r_med)
        if not steps:
            return _note(ax, f"needs {prefix}/lr, {prefix}/phase and {prefix}/trust_ratio_median")
        product = [x * y * z for x, y, z in zip(a, b, c, strict=True)]
        xs, ys = _positive(list(zip(steps, product, strict=True)))
        _line(ax, (xs, ys), color="C4")
        _log_y(ax, ys)

    def draw_sharpness(ax: Axes) -> None:
        ax.set_title(f"sharpness   [{prefix}/sharpness/...]")
        values: list[float] = []
        for name, series in sharpness.items():
            xs, ys = _finite(series)
            _line(ax, (xs, ys), label=name)
            values += ys
        _log_y(ax, values)
        ax.legend(fontsize=7)

    def draw_training(ax: Axes) -> None:
        ax.set_title("training metrics")
        handles = []
        for i, name in enumerate(losses):
            handles += _line(ax, _finite(metrics[name]), color=f"C{i}", label=name)
        if losses:
            ax.set_ylabel("loss")
        if accuracies:
            twin = ax.twinx() if losses else ax
            for i, name in enumerate(accuracies, start=len(losses)):
                handles += _line(twin, _finite(metrics[name]), "--", color=f"C{i}", label=name)
            twin.set_ylabel("accuracy")
        ax.legend(handles=handles, fontsize=7, loc="upper center")

    def draw_curves(ax: Axes) -> None:
        label = f"{prefix}/{metric}/<layer>"
        ax.set_ylabel(metric)
        if not layer_series:
            ax.set_title(f"per-layer {metric}")
            return _note(
                ax,
                f"no {label} metrics in this log (TVLARSMonitor(per_layer=False), or a "
                "name_filter that matched nothing?)",
            )
        count = len(layer_series)
        colours: list[Any] = [f"C{i % 10}" for i in range(count)]
        if count > LEGEND_MAX_LAYERS:
            import matplotlib

            cmap = matplotlib.colormaps["viridis"]
            colours = [cmap(0.9 * i / (count - 1)) for i in range(count)]
        values: list[float] = []
        for colour, (name, series) in zip(colours, layer_series.items(), strict=True):
            xs, ys = _positive(series)
            _line(ax, (xs, ys), color=colour, lw=1, label=name)
            values += ys
        _log_y(ax, values)
        if count > LEGEND_MAX_LAYERS:
            ax.set_title(
                f"per-layer {metric}, {count} layers   [{label}]   colour: layer order "
                "(dark: first, yellow: last)"
            )
        else:
            ax.set_title(f"per-layer {metric}   [{label}]")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)

    shown = _subsample(list(layer_series), max_layers)

    def draw_heatmap(ax: Axes) -> None:
        ax.set_xlabel("step (trainer.global_step)")
        if not shown:
            ax.set_title(f"log10 {metric} per layer")
            return _note(ax, f"no {prefix}/{metric}/<layer> metrics in this log")
        steps = sorted({s for name in shown for s, _ in layer_series[name]})
        column = {s: j for j, s in enumerate(steps)}
        grid = np.full((len(shown), len(steps)), np.nan)
        for i, name in enumerate(shown):
            for s, v in layer_series[name]:
                grid[i, column[s]] = v
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.ma.masked_invalid(np.log10(grid))  # zeros, negatives, inf: blank cells
        subset = (
            f", {len(shown)} of {len(layer_series)} layers evenly spread"
            if len(shown) < len(layer_series)
            else ""
        )
        ax.set_title(f"log10 {metric} per layer (rows in layer order, first on top{subset})")
        if logs.count() == 0:
            return _note(ax, f"no positive finite {metric} value to draw")
        rows = np.arange(len(shown) + 1) - 0.5
        mesh = ax.pcolormesh(_edges(steps), rows, logs, cmap="viridis", shading="flat")
        ax.set_ylim(len(shown) - 0.5, -0.5)
        every = max(1, math.ceil(len(shown) / DEFAULT_MAX_LAYERS))
        ticks = list(range(0, len(shown), every))
        ax.set_yticks(ticks, [shown[i] for i in ticks], fontsize=7)
        # Next to the heatmap, in the margin the per-layer legend already takes.
        bar = figure.colorbar(mesh, cax=ax.inset_axes((1.01, 0.0, 0.012, 1.0)))
        bar.set_label(f"log10 {metric}")

    halves: list[Callable[[Axes], None]] = [draw_phase, draw_lr, draw_summary, draw_effective]
    if sharpness:
        halves.append(draw_sharpness)
    if losses or accuracies:
        halves.append(draw_training)
    half_rows = math.ceil(len(halves) / 2)
    heat_height = min(9.0, max(2.6, 1.2 + 0.17 * len(shown)))
    heights = [2.7] * half_rows + [3.2, heat_height]
    figure = Figure(figsize=(FIGURE_WIDTH, sum(heights) + 0.6), layout="constrained")
    grid = figure.add_gridspec(len(heights), 2, height_ratios=heights)
    first: Axes | None = None
    cells = [
        grid[i // 2, :] if i == len(halves) - 1 and i % 2 == 0 else grid[i // 2, i % 2]
        for i in range(len(halves))
    ] + [grid[half_rows, :], grid[half_rows + 1, :]]
    for draw, cell in zip([*halves, draw_curves, draw_heatmap], cells, strict=True):
        ax = figure.add_subplot(cell, sharex=first)
        first = first or ax
        ax.grid(alpha=0.3)
        draw(ax)
    ax.grid(False)  # the heatmap

    steps = sorted(
        {s for name, series in metrics.items() if name.startswith(prefix + "/") for s, _ in series}
    )
    batch = sorted({v for _, v in get("effective_batch_size")})
    details = [f"{prefix}: steps {steps[0]}-{steps[-1]}"] if steps else [prefix]
    if batch:
        details.append(
            f"effective batch {batch[0]:g}"
            if len(batch) == 1
            else f"effective batch {batch[0]:g}-{batch[-1]:g}"
        )
    figure.suptitle(f"{source}\n{', '.join(details)}", fontsize=10)
    return figure


def plot_run(
    logdir: str | Path,
    out: str | Path | None = None,
    prefix: str = "tvlars",
    *,
    layers: str | re.Pattern[str] | None = None,
    max_layers: int = DEFAULT_MAX_LAYERS,
    metric: str = DEFAULT_METRIC,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Draw a run's TVLARS metrics to a PNG and return its path.

    Args:
        logdir: a run directory, a directory above runs (the newest is drawn, see
            :func:`find_logs`), or a ``metrics.csv`` / TensorBoard event file.
        out: the PNG (or a directory for it); default ``<prefix>.png`` next to the log read,
            i.e. ``LOGDIR/tvlars.png`` for a run directory.
        prefix, layers, max_layers, metric: see :func:`plot_metrics`.
        dpi: resolution; the figure is ``FIGURE_WIDTH`` inches wide.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        ValueError: no log, or no TVLARS metric in it (the message names the path).
    """
    log = find_logs(logdir)[-1]
    figure = plot_metrics(
        load_metrics(log),
        prefix,
        source=str(log),
        layers=layers,
        max_layers=max_layers,
        metric=metric,
    )
    if out is None:
        path = (log if log.is_dir() else log.parent) / f"{prefix}.png"
    else:
        path = Path(out) / f"{prefix}.png" if Path(out).is_dir() else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------------------- command line


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {err}") from err


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-tvlars plot``: prints the path of the PNG."""
    parser = OneLineArgumentParser(
        prog="lightning-tvlars plot",
        description="Draw phase, learning rate and per-layer trust ratios of a run logged by "
        "TVLARSMonitor (CSVLogger or TensorBoardLogger) to a PNG.",
    )
    parser.add_argument(
        "logdir",
        type=Path,
        help="a run directory (lightning_logs/version_3), a directory above runs (the newest "
        "is drawn), or a metrics.csv / events.out.tfevents.* file",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH",
        help="the PNG (default: PREFIX.png next to the log)",
    )
    parser.add_argument(
        "--prefix", default="tvlars", help="tvlars (first TVLARS optimizer), tvlars_1, ..."
    )
    parser.add_argument(
        "--layers",
        type=_regex,
        default=None,
        metavar="REGEX",
        help="only layers whose name contains a match of this regular expression",
    )
    parser.add_argument(
        "--max-layers",
        type=int_argument(1),
        default=DEFAULT_MAX_LAYERS,
        metavar="N",
        help="heatmap rows at most (evenly spread over the model; default %(default)s)",
    )
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        metavar="FAMILY",
        help="per-layer family of the curves and heatmap: trust_ratio (default), lnr, "
        "weight_norm, grad_norm, ...",
    )
    parser.add_argument(
        "--dpi",
        type=int_argument(1),
        default=DEFAULT_DPI,
        metavar="N",
        help=f"resolution (default %(default)s; the figure is {FIGURE_WIDTH:g} inches wide)",
    )
    args = parser.parse_args(argv)
    try:
        logs = find_logs(args.logdir)
        if len(logs) > 1:
            print(
                f"{args.logdir}: {len(logs)} runs found; drawing the newest, {logs[-1]}",
                file=sys.stderr,
            )
        path = plot_run(
            logs[-1],
            args.out,
            args.prefix,
            layers=args.layers,
            max_layers=args.max_layers,
            metric=args.metric,
            dpi=args.dpi,
        )
    except (OSError, ValueError, ImportError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(path)


if __name__ == "__main__":
    main()
