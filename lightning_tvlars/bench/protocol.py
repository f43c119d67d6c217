"""The accuracy benchmark's protocol: arms, their tuning axes, presets and the run planner.

Every *cell* (task x batch size x arm) is tuned the same way, on its own tuning seed:

1. **learning rate**: a log-spaced grid of ``2 * lr_steps + 1`` points, a quarter decade apart
   (x1.78), around the arm's centre, at the arm's default start setting; while the best
   validation accuracy lands on an edge, one more point past that edge (at most
   ``max_extensions`` times);
2. **start setting** at that learning rate: the other values of the arm's second axis (the
   phase for TVLARS, the warm-up length for LARS and LAMB), the same number for every arm;
3. **evaluation**: ``eval_seeds`` fresh seeds at the chosen (learning rate, setting).

Selection always uses validation accuracy; test accuracy is only reported. :func:`plan`
computes the runs still to do from the rows already written, so an interrupted benchmark
resumes where it stopped and parallel workers can take any run it returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

TASKS = ("classification", "barlow_twins")
Role = Literal["tune", "eval"]

#: The second axis of TVLARS arms: where the phase is halfway (fraction of the run), or the
#: authors' form. ``half=1`` is halfway at the end of the run (phi ends near 0.5).
PHASES = ("half=0.1", "half=0.3", "half=1", "authors")
#: The second axis of warm-up arms: linear warm-up over this fraction of the run.
WARMUPS = ("warmup=0.05", "warmup=0.1", "warmup=0.2", "warmup=0.4")


@dataclass(frozen=True)
class Arm:
    """One optimizer configuration under test.

    Attributes:
        name: the arm's name in tables and the CSV.
        optimizer: ``lars`` or ``lamb``, the package's (a
            :class:`~lightning_tvlars.TVLARSConfig`), or ``lightly-lars``, lightly's ``LARS`` as
            an external reference on the same groups and schedule.
        start: ``phase`` (tuned over :data:`PHASES`, no warm-up) or ``warmup`` (tuned over
            :data:`WARMUPS`, no phase).
        annealing: ``constant`` or ``cosine`` (after the warm-up, if any).
        lr_center: centre of the learning-rate grid (base rate at batch 256), per task, as
            quarter decades: ``q`` is the rate ``10 ** (q / 4)`` (0: 1.0, -8: 0.01).
        lr_scaling: how the base rate scales with the batch (``linear`` or ``sqrt``).
        axis: the second tuning axis (start settings).
        default: the start setting of the learning-rate search.
        paired: for TVLARS arms, the warm-up arm whose warm-up end is the early sharpness
            probe (the same step for both).
    """

    name: str
    optimizer: str
    start: str
    annealing: str
    lr_center: Mapping[str, int]
    lr_scaling: str
    axis: tuple[str, ...]
    default: str
    paired: str | None = None


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm(
            "tvlars",
            "lars",
            "phase",
            "constant",
            {"classification": 0, "barlow_twins": -1},
            "linear",
            PHASES,
            "half=0.3",
            paired="lars-warmup",
        ),
        Arm(
            "tvlars-cosine",
            "lars",
            "phase",
            "cosine",
            {"classification": 0, "barlow_twins": -1},
            "linear",
            PHASES,
            "half=0.3",
            paired="lars-warmup-cosine",
        ),
        Arm(
            "lars-warmup",
            "lars",
            "warmup",
            "constant",
            {"classification": 0, "barlow_twins": -1},
            "linear",
            WARMUPS,
            "warmup=0.2",
        ),
        Arm(
            "lars-warmup-cosine",
            "lars",
            "warmup",
            "cosine",
            {"classification": 0, "barlow_twins": -1},
            "linear",
            WARMUPS,
            "warmup=0.2",
        ),
        Arm(
            "lamb-warmup-cosine",
            "lamb",
            "warmup",
            "cosine",
            {"classification": -8, "barlow_twins": -9},
            "sqrt",
            WARMUPS,
            "warmup=0.2",
        ),
        Arm(
            "lightly-lars-warmup-cosine",
            "lightly-lars",
            "warmup",
            "cosine",
            {"classification": 0, "barlow_twins": -1},
            "linear",
            WARMUPS,
            "warmup=0.2",
        ),
    )
}

#: The comparisons of the report, ``(a, b, what a - b measures)``; Holm's correction runs over
#: every one that has data, across tasks and batch sizes.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("tvlars", "lars-warmup", "phase instead of warm-up (constant LR)"),
    ("tvlars-cosine", "lars-warmup-cosine", "phase instead of warm-up (cosine LR)"),
    ("tvlars", "lars-warmup-cosine", "TVLARS as published vs the paper's LARS baseline"),
    ("tvlars", "lamb-warmup-cosine", "TVLARS as published vs the paper's LAMB baseline"),
    ("tvlars-cosine", "lamb-warmup-cosine", "TVLARS + cosine vs LAMB"),
    ("tvlars-cosine", "tvlars", "cosine annealing, with the phase"),
    ("lars-warmup-cosine", "lars-warmup", "cosine annealing, with warm-up"),
)


def setting_value(setting: str) -> float | None:
    """The number in ``half=0.3`` / ``warmup=0.2`` (``None`` for ``authors``)."""
    _, _, value = setting.partition("=")
    return float(value) if value else None


@dataclass(frozen=True)
class Probe:
    """Sharpness measured at the end of warm-up and at the end of training, on a fixed batch.

    Attributes:
        num_samples: samples of the fixed probe batch (the first training samples).
        iterations: power-iteration Hessian-vector products (top eigenvalue).
        trace_samples: Hutchinson probes (trace).
        directions: filter-normalized random directions, each with both signs.
    """

    num_samples: int = 512
    iterations: int = 20
    trace_samples: int = 10
    directions: int = 5


@dataclass(frozen=True)
class Preset:
    """A benchmark size. See the module docstring for the protocol.

    Attributes:
        name: preset name; ``stem`` names the output files (``<stem>.csv``, ``.md``, ``.png``).
        tasks: ``classification`` and/or ``barlow_twins``.
        batch_sizes: per-step batch sizes.
        arms: the arms per task.
        epochs: training epochs per task (the same for every batch size).
        num_samples, val_size, corr_noise_scale, iid_noise_scale: MNIST-1D (80% train + val,
            20% test; ``val_size`` held out of the training part for selection).
        width, blocks, projection_dim: the 1-D ResNet encoder (and Barlow Twins head).
        lr_steps: grid points on each side of the centre; max_extensions: grid extensions.
        tune_seed: the seed of every tuning run; eval_seeds: fresh seeds per chosen setting.
        converged_train_accuracy: per task, a run whose final training accuracy (the linear
            probe's for Barlow Twins) is below this is flagged "not converged". Classification:
            about 6 points under converged small-batch runs (91-92%); Barlow Twins: above what
            the linear probe gets from an untrained, random encoder (61-65%).
        probe: the sharpness probe's size.
        jobs, device: defaults of ``--jobs`` and ``--device``.
    """

    name: str
    stem: str
    tasks: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    arms: Mapping[str, tuple[str, ...]]
    epochs: Mapping[str, int]
    num_samples: int
    val_size: int
    corr_noise_scale: float | None = 0.25
    iid_noise_scale: float | None = 0.06
    width: int = 16
    blocks: int = 1
    projection_dim: int = 256
    lr_steps: int = 2
    max_extensions: int = 2
    axis_size: int | None = None
    tune_seed: int = 0
    eval_seeds: int = 8
    converged_train_accuracy: Mapping[str, float] = field(
        default_factory=lambda: {"classification": 0.85, "barlow_twins": 0.7}
    )
    probe: Probe = field(default_factory=Probe)
    jobs: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"task {task!r} is invalid: expected one of {TASKS}")
            for arm in self.arms[task]:
                if arm not in ARMS:
                    raise ValueError(f"arm {arm!r} is invalid: expected one of {sorted(ARMS)}")

    def axis(self, arm: Arm) -> tuple[str, ...]:
        """The start settings tuned for ``arm`` (its default first)."""
        rest = tuple(s for s in arm.axis if s != arm.default)
        values = (arm.default, *rest)
        return values[: self.axis_size] if self.axis_size else values

    @property
    def seeds(self) -> tuple[int, ...]:
        """The evaluation seeds: fresh, never the tuning seed."""
        first = self.tune_seed + 1
        return tuple(range(first, first + self.eval_seeds))

    def lr(self, arm: Arm, task: str, k: int) -> float:
        """Grid point ``k`` (0 = the centre): ``10 ** ((centre + k) / 4)``, 4 significant
        digits (0.3162, 0.5623, 1, 1.778, 3.162, ...)."""
        return float(f"{10 ** ((arm.lr_center[task] + k) / 4):.4g}")

    def quick(self) -> Preset:
        """The same protocol on a tiny size, to check the pipeline end to end (CI)."""
        return replace(
            self,
            name=f"{self.name}-quick",
            batch_sizes=(32, 128),
            epochs=dict.fromkeys(self.epochs, 1),
            num_samples=1_000,
            val_size=100,
            width=4,
            projection_dim=16,
            lr_steps=1,
            max_extensions=1,
            axis_size=2,
            eval_seeds=2,
            converged_train_accuracy=dict.fromkeys(self.converged_train_accuracy, 0.0),
            probe=Probe(num_samples=64, iterations=3, trace_samples=2, directions=2),
        )


CLASSIFICATION_ARMS = (
    "tvlars",
    "tvlars-cosine",
    "lars-warmup",
    "lars-warmup-cosine",
    "lamb-warmup-cosine",
)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        stem="accuracy",
        tasks=("classification",),
        batch_sizes=(1024, 4096),
        arms={"classification": CLASSIFICATION_ARMS},
        epochs={"classification": 60},
        num_samples=40_000,
        val_size=3_000,
        eval_seeds=8,
        jobs=2,
    ),
    "gpu": Preset(
        name="gpu",
        stem="accuracy_gpu",
        tasks=("classification", "barlow_twins"),
        batch_sizes=(4096, 8192, 16384),
        arms={
            "classification": CLASSIFICATION_ARMS,
            "barlow_twins": ("tvlars", "lars-warmup-cosine", "lamb-warmup-cosine"),
        },
        epochs={"classification": 60, "barlow_twins": 30},
        num_samples=150_000,
        val_size=5_000,
        eval_seeds=8,
        jobs=12,
        device="cuda",
    ),
}


# ------------------------------------------------------------------------------ run specs


@dataclass(frozen=True)
class RunSpec:
    """One training run: what :func:`lightning_tvlars.bench.train.run` trains.

    Attributes:
        task, arm, batch_size, seed, lr, setting: what is trained.
        role: ``tune`` (selection) or ``eval`` (reported).
        stage: ``lr``, ``axis`` or ``eval`` (how the planner got there).
        probe_fraction: the early sharpness probe runs after this fraction of the steps.
    """

    task: str
    arm: str
    batch_size: int
    seed: int
    role: Role
    stage: str
    lr: float
    setting: str
    probe_fraction: float

    @property
    def key(self) -> tuple[str, str, int, int, str, float, str]:
        return (self.task, self.arm, self.batch_size, self.seed, self.role, self.lr, self.setting)


def row_key(row: Mapping[str, Any]) -> tuple[str, str, int, int, str, float, str]:
    """The :attr:`RunSpec.key` of a CSV row (values may be strings)."""
    return (
        str(row["task"]),
        str(row["arm"]),
        int(row["batch_size"]),
        int(row["seed"]),
        str(row["role"]),
        float(row["lr"]),
        str(row["setting"]),
    )


def _score(row: Mapping[str, Any]) -> float:
    value = float(row["val_accuracy"])
    return value if math.isfinite(value) else -math.inf


@dataclass(frozen=True)
class CellState:
    """Where a cell's tuning stands.

    Attributes:
        lr: the chosen learning rate (``None`` until the LR stage is complete).
        setting: the chosen start setting (``None`` until the axis stage is complete).
        grid: the learning-rate grid points run so far (``k`` values).
        todo: tuning runs still needed, as ``(stage, k, setting)``.
    """

    lr: float | None
    setting: str | None
    grid: tuple[int, ...]
    todo: tuple[tuple[str, int, str], ...]


def cell_state(
    preset: Preset, task: str, batch_size: int, arm: Arm, rows: Iterable[Mapping[str, Any]]
) -> CellState:
    """The tuning decisions of one cell from its tuning rows (see the module docstring)."""
    tuned = {
        (float(r["lr"]), str(r["setting"])): r
        for r in rows
        if (r["task"], r["arm"], int(r["batch_size"]), r["role"], int(r["seed"]))
        == (task, arm.name, batch_size, "tune", preset.tune_seed)
    }
    default = arm.default
    grid = list(range(-preset.lr_steps, preset.lr_steps + 1))
    while True:
        missing = [k for k in grid if (preset.lr(arm, task, k), default) not in tuned]
        if missing:
            return CellState(None, None, tuple(grid), tuple(("lr", k, default) for k in missing))
        # best validation accuracy; ties go to the smaller learning rate
        best = max(grid, key=lambda k: (_score(tuned[(preset.lr(arm, task, k), default)]), -k))
        extensions = len(grid) - (2 * preset.lr_steps + 1)
        if best == grid[-1] and extensions < preset.max_extensions:
            grid.append(best + 1)
        elif best == grid[0] and extensions < preset.max_extensions:
            grid.insert(0, best - 1)
        else:
            break
    lr = preset.lr(arm, task, best)
    axis = preset.axis(arm)
    missing_axis = [s for s in axis if (lr, s) not in tuned]
    if missing_axis:
        return CellState(lr, None, tuple(grid), tuple(("axis", best, s) for s in missing_axis))
    # ties go to the earlier setting of the axis (the LR search's default first)
    setting = max(axis, key=lambda s: (_score(tuned[(lr, s)]), -axis.index(s)))
    return CellState(lr, setting, tuple(grid), ())


def early_probe(
    preset: Preset,
    task: str,
    batch_size: int,
    arm: Arm,
    setting: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    tuning: bool,
) -> float | None:
    """The fraction of the run after which the early sharpness probe runs.

    A warm-up arm: the end of its own warm-up. A TVLARS arm: the same step as its paired
    warm-up arm (the LR search's default warm-up in tuning runs, the paired arm's chosen
    warm-up in evaluation runs; ``None`` while that is not chosen yet).
    """
    if arm.start == "warmup":
        value = setting_value(setting)
        assert value is not None
        return value
    names = [a for a in (arm.paired, "lars-warmup-cosine", "lars-warmup") if a]
    paired = next((ARMS[a] for a in names if a in preset.arms[task]), ARMS["lars-warmup-cosine"])
    if tuning or paired.name not in preset.arms[task]:
        return setting_value(paired.default)
    chosen = cell_state(preset, task, batch_size, paired, rows).setting
    return None if chosen is None else setting_value(chosen)


def plan(preset: Preset, rows: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """Every run that can start now, given the finished ``rows``.

    Tuning runs of a stage come once the previous stage of their cell is complete;
    evaluation runs once the cell is tuned (and, for TVLARS arms, once the paired warm-up arm
    is, for the early probe's step). Runs already in ``rows`` are left out. The order is the
    order of priority: the largest batch first (the question of the benchmark, and the
    cheapest runs), then task by task, so that a time budget cuts the least useful runs.
    """
    done = {row_key(r) for r in rows}
    todo: list[RunSpec] = []
    for batch_size in sorted(preset.batch_sizes, reverse=True):
        for task in preset.tasks:
            for name in preset.arms[task]:
                todo += _cell_plan(preset, task, batch_size, ARMS[name], rows)
    return [spec for spec in todo if spec.key not in done]


def _cell_plan(
    preset: Preset, task: str, batch_size: int, arm: Arm, rows: Sequence[Mapping[str, Any]]
) -> list[RunSpec]:
    """The runs of one cell that its stage allows now (finished ones included)."""
    state = cell_state(preset, task, batch_size, arm, rows)
    specs = []
    for stage, k, setting in state.todo:
        fraction = early_probe(preset, task, batch_size, arm, setting, rows, tuning=True)
        assert fraction is not None
        lr = preset.lr(arm, task, k)
        specs.append(
            RunSpec(
                task, arm.name, batch_size, preset.tune_seed, "tune", stage, lr, setting, fraction
            )
        )
    if state.setting is None or state.lr is None:
        return specs
    fraction = early_probe(preset, task, batch_size, arm, state.setting, rows, tuning=False)
    if fraction is None:  # a TVLARS arm waiting for its paired warm-up arm
        return specs
    return specs + [
        RunSpec(task, arm.name, batch_size, seed, "eval", "eval", state.lr, state.setting, fraction)
        for seed in preset.seeds
    ]
