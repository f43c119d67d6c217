"""The protocol of the accuracy benchmark and of ``lightning-tvlars compare``: arms, their
tuning axes, the tuning rules (:class:`Study`), the benchmark's presets and the run planner.

Every *cell* (task x batch size x arm) is tuned the same way, on the mean of a validation
metric over the same tuning seeds (:attr:`Study.tune_seeds`):

1. **learning rate**: a log-spaced grid of ``2 * lr_steps + 1`` points, a quarter decade apart
   (x1.78), around the arm's centre, at the arm's default setting; while the best point is at
   an edge, or an edge scores within the validation noise of the best (one standard error of
   the difference, see :meth:`Study.within_noise`), one more point past that edge (at most
   ``max_extensions`` times per side). An explicit grid (:attr:`Study.lr_points`) is not
   extended;
2. **second axis** at that learning rate: the other values of the arm's axis (the phase for
   phase arms, the warm-up length for warm-up arms, the trust coefficient for plain LARS), the
   same number for every arm;
3. **evaluation**: ``eval_seeds`` fresh seeds at the chosen (learning rate, setting).

Selection always uses the validation metric (:attr:`Study.metric`, maximized or minimized);
test metrics are only reported. :func:`plan` computes the runs still to do from the rows
already written, so an interrupted run resumes where it stopped and parallel workers can take
any run it returns. The benchmark's :class:`Preset` adds MNIST-1D's data and models to the
rules; ``lightning-tvlars compare`` uses the rules alone on a user's LightningModule.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

TASKS = ("classification", "barlow_twins", "deep_classification")
Role = Literal["tune", "eval"]
Start = Literal["phase", "warmup", "none", "warmup-phase"]

#: The axis of phase arms: where the phase is halfway (fraction of the run), or the authors'
#: form with their norm clamp at 10. ``half=1`` is halfway at the end (phi ends near 0.5).
PHASES = ("half=0.3", "authors", "half=1", "half=0.1")
#: The axis of warm-up arms: a linear warm-up over this fraction of the run.
WARMUPS = ("warmup=0.2", "warmup=0.1", "warmup=0.4", "warmup=0.05")
#: The axis of plain LARS (no warm-up, no phase, nothing else to tune): the trust coefficient.
TRUST = ("trust=0.001", "trust=0.002", "trust=0.0005", "trust=0.004")

#: Quarter decades of the base rate at batch 256 at the centre of each grid, per family.
LARS_CENTER = {"classification": 0, "barlow_twins": -1, "deep_classification": 0}
LAMB_CENTER = {"classification": -8, "barlow_twins": -9, "deep_classification": -8}
#: The centre of a task the benchmark has not tuned (a user's model): the optimizer's default
#: base rate at batch 256 (LARS 1.0, LAMB 0.01), per optimizer family.
DEFAULT_CENTER = {"lars": 0, "lamb": -8}


@dataclass(frozen=True)
class Arm:
    """One optimizer configuration under test, a :class:`~lightning_tvlars.TVLARSConfig`.

    Attributes:
        name: the arm's name in tables and the CSV.
        optimizer: ``lars`` or ``lamb``, the package's, or ``lightly-lars``, lightly's ``LARS``
            as an external reference on the same groups and schedule.
        start: ``phase`` (no warm-up, the phase from step 0), ``warmup`` (linear warm-up, no
            phase), ``none`` (neither) or ``warmup-phase`` (a warm-up, and the phase chosen for
            ``phase_from`` in the same task and batch size).
        annealing: ``constant`` or ``cosine`` (after the warm-up, if any).
        lr_center: centre of the learning-rate grid (base rate at batch 256), per task, as
            quarter decades: ``q`` is the rate ``10 ** (q / 4)`` (0: 1.0, -8: 0.01).
        lr_scaling: how the base rate scales with the batch (``linear`` or ``sqrt``).
        axis: the second tuning axis, its first value the default of the learning-rate search.
        paired: the warm-up arm whose warm-up end is this arm's early sharpness probe (the
            same step for both), for arms without a warm-up of their own.
        phase_from: the phase arm whose chosen phase a ``warmup-phase`` arm takes.
    """

    name: str
    optimizer: str
    start: Start
    annealing: str
    lr_center: Mapping[str, int]
    lr_scaling: str
    axis: tuple[str, ...]
    paired: str | None = None
    phase_from: str | None = None

    @property
    def default(self) -> str:
        return self.axis[0]

    @property
    def family(self) -> str:
        """``lamb`` or ``lars`` (lightly's LARS included): which learning rates suit it."""
        return "lamb" if self.optimizer == "lamb" else "lars"


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("tvlars", "lars", "phase", "constant", LARS_CENTER, "linear", PHASES, "lars-warmup"),
        Arm(
            "tvlars-cosine",
            "lars",
            "phase",
            "cosine",
            LARS_CENTER,
            "linear",
            PHASES,
            "lars-warmup-cosine",
        ),
        Arm("lars", "lars", "none", "constant", LARS_CENTER, "linear", TRUST, "lars-warmup"),
        Arm("lars-warmup", "lars", "warmup", "constant", LARS_CENTER, "linear", WARMUPS),
        Arm("lars-warmup-cosine", "lars", "warmup", "cosine", LARS_CENTER, "linear", WARMUPS),
        Arm(
            "lars-warmup-phase",
            "lars",
            "warmup-phase",
            "constant",
            LARS_CENTER,
            "linear",
            WARMUPS,
            phase_from="tvlars",
        ),
        Arm("lamb-warmup-cosine", "lamb", "warmup", "cosine", LAMB_CENTER, "sqrt", WARMUPS),
        Arm(
            "tvlamb", "lamb", "phase", "constant", LAMB_CENTER, "sqrt", PHASES, "lamb-warmup-cosine"
        ),
        Arm(
            "lightly-lars-warmup-cosine",
            "lightly-lars",
            "warmup",
            "cosine",
            LARS_CENTER,
            "linear",
            WARMUPS,
        ),
    )
}


@dataclass(frozen=True)
class Comparison:
    """``a - b`` and what the difference isolates (what the two arms do differently)."""

    a: str
    b: str
    isolates: str


#: The comparisons of the report; Holm's correction runs over every one that has data, across
#: tasks and batch sizes.
COMPARISONS: tuple[Comparison, ...] = (
    Comparison("tvlars", "lars", "the phase, without warm-up (the paper's claim; constant LR)"),
    Comparison("lars-warmup", "lars", "the warm-up (constant LR, no phase)"),
    Comparison(
        "tvlars",
        "lars-warmup-phase",
        "the start alone: full LR from step 0 vs a warm-up, the same phase after",
    ),
    Comparison(
        "lars-warmup-phase", "lars-warmup", "the phase's decay alone, after a warm-up (constant LR)"
    ),
    Comparison(
        "tvlars",
        "lars-warmup",
        "phase (start and decay) vs warm-up (start only), constant LR",
    ),
    Comparison(
        "tvlars-cosine",
        "lars-warmup-cosine",
        "phase vs warm-up under cosine annealing (start and the phase's decay)",
    ),
    Comparison("tvlars-cosine", "tvlars", "cosine annealing, with the phase"),
    Comparison("lars-warmup-cosine", "lars-warmup", "cosine annealing, after a warm-up"),
    Comparison(
        "tvlars",
        "lars-warmup-cosine",
        "TVLARS as published vs the paper's LARS baseline (start, decay and annealing differ)",
    ),
    Comparison(
        "tvlars",
        "lamb-warmup-cosine",
        "TVLARS as published vs the LAMB baseline (optimizer, start, decay and annealing)",
    ),
    Comparison(
        "tvlamb",
        "lamb-warmup-cosine",
        "the phase for LAMB vs warm-up + cosine (start, decay and annealing)",
    ),
    Comparison("tvlamb", "tvlars", "LAMB vs LARS, both with the phase (the update rule)"),
)


def comparisons_for(arms: Sequence[str]) -> tuple[Comparison, ...]:
    """The comparisons among ``arms``: those of :data:`COMPARISONS` whose arms are both in,
    then every other pair (in the order of ``arms``), named by what their recipes do
    differently (optimizer, start, annealing)."""
    chosen = [c for c in COMPARISONS if c.a in arms and c.b in arms]
    covered = {frozenset((c.a, c.b)) for c in chosen}
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            if frozenset((a, b)) in covered:
                continue
            differences = [
                f"{what} ({getattr(ARMS[a], name)} vs {getattr(ARMS[b], name)})"
                for name, what in (
                    ("optimizer", "optimizer"),
                    ("start", "start"),
                    ("annealing", "annealing"),
                )
                if getattr(ARMS[a], name) != getattr(ARMS[b], name)
            ]
            chosen.append(Comparison(a, b, ", ".join(differences) or "the tuned setting"))
    return tuple(chosen)


def setting_value(setting: str, key: str | None = None) -> float | None:
    """The number of ``key=`` in a setting (``half=0.3``, ``warmup=0.2+half=0.3``, with
    ``key=None`` the first part's); ``None`` for ``authors`` or a missing key."""
    for part in setting.split("+"):
        name, _, value = part.partition("=")
        if key is None or name == key:
            return float(value) if value else None
    return None


def setting_part(setting: str, key: str) -> str | None:
    """The ``key`` part of a setting: ``phase`` (``half=...`` or ``authors``), ``warmup`` or
    ``trust``."""
    for part in setting.split("+"):
        name = part.partition("=")[0]
        if name == key or (key == "phase" and (name == "half" or part == "authors")):
            return part
    return None


@dataclass(frozen=True)
class Probe:
    """Sharpness measured at the end of warm-up and at the end of training, on a fixed batch
    (BatchNorm on that batch's statistics, the loss the optimizer sees).

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
class Model:
    """The 1-D ResNet of a task: ``width`` channels, ``blocks`` residual blocks."""

    width: int = 16
    blocks: int = 1


#: The models per task: the small encoder of v1/v2 (3,642 parameters with its classifier) and,
#: for ``deep_classification``, one where layer-wise adaptation has layers to adapt (about
#: 107k parameters, 21 adapted tensors).
MODELS: dict[str, Model] = {
    "classification": Model(16, 1),
    "barlow_twins": Model(16, 1),
    "deep_classification": Model(42, 9),
}


Mode = Literal["max", "min"]


@dataclass(frozen=True, kw_only=True)
class Study:
    """What is compared and the tuning rules (see the module docstring): what
    :func:`cell_state` and :func:`plan` need, shared by the benchmark's :class:`Preset` and
    ``lightning-tvlars compare``.

    Attributes:
        tasks: the tasks (a name per model and data); the planner runs the largest batch size
            first, the tasks in this order within one.
        batch_sizes: per-step batch sizes, per task.
        arms: the arms per task.
        lr_steps: grid points on each side of the centre; max_extensions: grid extensions per
            side.
        lr_points: explicit base learning rates per optimizer family (``lars``, ``lamb``)
            instead of the grid around the arm's centre; not extended.
        axis_size: values of the second axis tuned (the arm's first ones; ``None``: all).
        tune_seeds: the seeds every tuning point runs (selection on their mean);
            eval_seeds: the number of fresh seeds per chosen setting.
        metric: the column of the rows that selection reads (a validation metric).
        mode: ``max`` or ``min``: which values of ``metric`` are better.
    """

    tasks: tuple[str, ...]
    batch_sizes: Mapping[str, tuple[int, ...]]
    arms: Mapping[str, tuple[str, ...]]
    lr_steps: int = 2
    max_extensions: int = 2
    lr_points: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    axis_size: int | None = None
    tune_seeds: tuple[int, ...] = (0, 1)
    eval_seeds: int = 8
    metric: str = "val_accuracy"
    mode: Mode = "max"

    def __post_init__(self) -> None:
        for task in self.tasks:
            for arm in self.arms[task]:
                if arm not in ARMS:
                    raise ValueError(f"arm {arm!r} is invalid: expected one of {sorted(ARMS)}")
                source = ARMS[arm].phase_from
                if source is not None and source not in self.arms[task]:
                    raise ValueError(f"arm {arm!r} takes the phase of {source!r}: add it")
        if not self.tune_seeds:
            raise ValueError("tune_seeds is empty: expected at least one seed")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode={self.mode!r} is invalid: expected 'max' or 'min'")
        for family, points in self.lr_points.items():
            if family not in DEFAULT_CENTER or not points or list(points) != sorted(set(points)):
                raise ValueError(
                    f"lr_points[{family!r}]={points!r} is invalid: expected increasing rates of "
                    f"a family in {sorted(DEFAULT_CENTER)}"
                )

    def axis(self, arm: Arm) -> tuple[str, ...]:
        """The second-axis values tuned for ``arm`` (its default first)."""
        return arm.axis[: self.axis_size] if self.axis_size else arm.axis

    @property
    def seeds(self) -> tuple[int, ...]:
        """The evaluation seeds: fresh, after the tuning seeds."""
        first = max(self.tune_seeds) + 1
        return tuple(range(first, first + self.eval_seeds))

    def lr(self, arm: Arm, task: str, k: int) -> float:
        """Grid point ``k``: of an explicit grid, its ``k``-th rate; otherwise (0 = the centre)
        ``10 ** ((centre + k) / 4)``, 4 significant digits (0.3162, 0.5623, 1, 1.778, ...)."""
        points = self.lr_points.get(arm.family)
        if points:
            return points[k]
        centre = arm.lr_center.get(task, DEFAULT_CENTER[arm.family])
        return float(f"{10 ** ((centre + k) / 4):.4g}")

    def lr_indices(self, arm: Arm) -> tuple[int, ...]:
        """The grid points (``k``) of the learning-rate search before any extension."""
        points = self.lr_points.get(arm.family)
        if points:
            return tuple(range(len(points)))
        return tuple(range(-self.lr_steps, self.lr_steps + 1))

    def extensions(self, arm: Arm) -> int:
        """How many times the grid may grow past each edge (none for an explicit grid)."""
        return 0 if self.lr_points.get(arm.family) else self.max_extensions

    def score(self, row: Mapping[str, Any]) -> float:
        """The row's :attr:`metric`; a diverged run (not finite) scores the worst possible."""
        value = float(row[self.metric])
        if math.isfinite(value):
            return value
        return -math.inf if self.mode == "max" else math.inf

    def better(self, value: float) -> float:
        """``value`` as a key that is larger when better (``-value`` when minimizing)."""
        return value if self.mode == "max" else -value

    def within_noise(self, best: float, other: float, spread: tuple[float, float]) -> bool:
        """Whether ``other`` (a mean over the tuning seeds) is within one standard error of the
        difference from ``best``, from the tuning seeds' spread: ``spread`` holds the sample
        variances of both points, and the error is ``sqrt((var_b + var_o) / seeds)``. With
        one tuning seed no spread is known: only a tie is within the noise. Diverged points
        are within the noise of each other only."""
        if not (math.isfinite(best) and math.isfinite(other)):
            return best == other
        error = math.sqrt(sum(v for v in spread if math.isfinite(v)) / len(self.tune_seeds))
        return self.better(best) - self.better(other) <= error


@dataclass(frozen=True, kw_only=True)
class Preset(Study):
    """A benchmark size: the tuning rules of :class:`Study` on MNIST-1D. See the module
    docstring for the protocol; selection reads ``val_accuracy`` (noise: binomial over the
    ``val_size`` validation samples, :func:`within_noise`).

    Attributes:
        name: preset name; ``stem`` names the output files (``<stem>.csv``, ``.md``, ``.png``).
        tasks: ``classification``, ``barlow_twins`` and/or ``deep_classification``.
        epochs: training epochs per task (the same for every batch size).
        num_samples, val_size, corr_noise_scale, iid_noise_scale: MNIST-1D (80% train + val,
            20% test; ``val_size`` held out of the training part for selection).
        models: the 1-D ResNet per task; projection_dim: the Barlow Twins projector's width.
        converged_train_accuracy: per task, a run whose final training accuracy (the linear
            probe's for Barlow Twins) is below this is flagged "not converged".
        probe: the sharpness probe's size.
        jobs, device: defaults of ``--jobs`` and ``--device``.
    """

    name: str
    stem: str
    epochs: Mapping[str, int]
    num_samples: int
    val_size: int
    corr_noise_scale: float | None = 0.25
    iid_noise_scale: float | None = 0.06
    models: Mapping[str, Model] = field(default_factory=lambda: dict(MODELS))
    projection_dim: int = 256
    converged_train_accuracy: Mapping[str, float] = field(
        default_factory=lambda: {
            "classification": 0.8,
            "barlow_twins": 0.7,
            "deep_classification": 0.8,
        }
    )
    probe: Probe = field(default_factory=Probe)
    jobs: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"task {task!r} is invalid: expected one of {TASKS}")
        super().__post_init__()

    def score(self, row: Mapping[str, Any]) -> float:
        """Validation accuracy; a diverged run scores as nothing learnt (0)."""
        value = float(row[self.metric])
        return value if math.isfinite(value) else 0.0

    def within_noise(self, best: float, other: float, spread: tuple[float, float]) -> bool:
        """:func:`within_noise` over the ``val_size`` validation samples (binomial)."""
        return within_noise(best, other, self.val_size, len(self.tune_seeds))

    def quick(self) -> Preset:
        """The same protocol on a tiny size, to check the pipeline end to end (CI)."""
        return replace(
            self,
            name=f"{self.name}-quick",
            batch_sizes={t: (32, 128) if t == "classification" else (128,) for t in self.tasks},
            epochs=dict.fromkeys(self.epochs, 1),
            num_samples=1_000,
            val_size=100,
            models=dict.fromkeys(self.models, Model(4, 1)),
            projection_dim=16,
            lr_steps=1,
            max_extensions=1,
            axis_size=2,
            tune_seeds=(0,),
            eval_seeds=2,
            converged_train_accuracy=dict.fromkeys(self.converged_train_accuracy, 0.0),
            probe=Probe(num_samples=64, iterations=3, trace_samples=2, directions=2),
        )


CLASSIFICATION_ARMS = (
    "tvlars",
    "lars",
    "lars-warmup",
    "lars-warmup-phase",
    "lars-warmup-cosine",
    "tvlars-cosine",
    "lamb-warmup-cosine",
    "tvlamb",
)
#: The arms of the self-supervised cell and of the deeper model.
HEADLINE_ARMS = ("tvlars", "lars", "lars-warmup-cosine", "lamb-warmup-cosine", "tvlamb")

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        stem="accuracy",
        tasks=("classification", "barlow_twins"),
        batch_sizes={"classification": (4096, 1024), "barlow_twins": (4096, 1024)},
        arms={"classification": CLASSIFICATION_ARMS, "barlow_twins": HEADLINE_ARMS},
        epochs={"classification": 30, "barlow_twins": 10},
        num_samples=40_000,
        val_size=3_000,
        projection_dim=128,
        axis_size=3,
        jobs=2,
    ),
    "gpu": Preset(
        name="gpu",
        stem="accuracy_gpu",
        tasks=("barlow_twins", "deep_classification", "classification"),
        batch_sizes={
            "barlow_twins": (16384, 4096),
            "deep_classification": (8192,),
            "classification": (16384, 8192, 4096),
        },
        arms={
            "barlow_twins": HEADLINE_ARMS,
            "deep_classification": HEADLINE_ARMS,
            "classification": CLASSIFICATION_ARMS,
        },
        epochs={"classification": 60, "barlow_twins": 30, "deep_classification": 30},
        num_samples=150_000,
        val_size=5_000,
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


#: The columns :func:`spec_columns` fills: what a run trained (the benchmark's and compare's CSVs).
SPEC_FIELDS = (
    "task",
    "arm",
    "optimizer",
    "start",
    "setting",
    "annealing",
    "batch_size",
    "seed",
    "role",
    "stage",
    "lr",
)
#: What the sharpness probe measures, each a column at the end of the warm-up and of training.
SHARPNESS_FIELDS = ("loss", "top_eigenvalue", "trace", "filter_normalized")
#: The probe's columns in both CSVs: ``early_*`` (its step first), ``end_*``, its time.
PROBE_FIELDS = (
    "early_step",
    *(f"early_{name}" for name in SHARPNESS_FIELDS),
    *(f"end_{name}" for name in SHARPNESS_FIELDS),
    "probe_seconds",
)


def spec_columns(spec: RunSpec) -> dict[str, Any]:
    """The columns of a run's CSV row that say what was trained: the spec and its arm's recipe
    (``optimizer``, ``start``, ``annealing``); the benchmark and ``compare`` add what came out."""
    arm = ARMS[spec.arm]
    return {
        "task": spec.task,
        "arm": spec.arm,
        "optimizer": arm.optimizer,
        "start": arm.start,
        "setting": spec.setting,
        "annealing": arm.annealing,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
        "role": spec.role,
        "stage": spec.stage,
        "lr": f"{spec.lr:.4g}",
    }


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


def within_noise(best: float, other: float, n: int, seeds: int) -> bool:
    """Whether validation accuracy ``other`` is within one standard error of the difference
    from ``best``: binomial errors of two means over ``seeds`` runs of ``n`` samples each,
    ``sqrt((p_b (1 - p_b) + p_o (1 - p_o)) / (n seeds))``."""
    variance = sum(min(max(p, 0.0), 1.0) * (1 - min(max(p, 0.0), 1.0)) for p in (best, other))
    return best - other <= math.sqrt(variance / (n * seeds))


@dataclass(frozen=True)
class CellState:
    """Where a cell's tuning stands.

    Attributes:
        lr: the chosen learning rate (``None`` until the LR stage is complete).
        setting: the chosen setting (``None`` until the axis stage is complete).
        grid: the learning-rate grid points run so far (``k`` values).
        scores: mean of the validation metric over the tuning seeds per ``(lr, setting)``
            done (a diverged run counted as :meth:`Study.score` says).
        settings: the settings of the second axis (the learning-rate search's first).
        todo: tuning points still needed, as ``(stage, k, setting)`` (each on every tuning
            seed); empty with ``waiting`` set while an arm it depends on is not tuned.
        waiting: the arm whose choice this cell waits for, if any.
    """

    lr: float | None
    setting: str | None
    grid: tuple[int, ...]
    scores: Mapping[tuple[float, str], float]
    settings: tuple[str, ...]
    todo: tuple[tuple[str, int, str], ...]
    waiting: str | None = None


def _axis_settings(
    study: Study, task: str, batch_size: int, arm: Arm, rows: Sequence[Mapping[str, Any]]
) -> tuple[str, ...] | None:
    """The settings tuned for ``arm`` in this cell; for a ``warmup-phase`` arm, each warm-up
    with the phase chosen for its ``phase_from`` arm (``None`` while that is not chosen)."""
    axis = study.axis(arm)
    if arm.phase_from is None:
        return axis
    phase = cell_state(study, task, batch_size, ARMS[arm.phase_from], rows).setting
    if phase is None:
        return None
    return tuple(f"{warmup}+{phase}" for warmup in axis)


def cell_state(
    study: Study, task: str, batch_size: int, arm: Arm, rows: Iterable[Mapping[str, Any]]
) -> CellState:
    """The tuning decisions of one cell from its tuning rows (see the module docstring)."""
    rows = list(rows)
    runs: dict[tuple[float, str], dict[int, float]] = {}
    for r in rows:
        if (r["task"], r["arm"], int(r["batch_size"]), r["role"]) == (
            task,
            arm.name,
            batch_size,
            "tune",
        ) and int(r["seed"]) in study.tune_seeds:
            key = (float(r["lr"]), str(r["setting"]))
            runs.setdefault(key, {})[int(r["seed"])] = study.score(r)
    complete = {
        point: list(by_seed.values())
        for point, by_seed in runs.items()
        if set(by_seed) == set(study.tune_seeds)
    }
    scores = {point: statistics.fmean(values) for point, values in complete.items()}
    spread = {
        point: statistics.variance(values) if len(values) > 1 else 0.0
        for point, values in complete.items()
    }
    settings = _axis_settings(study, task, batch_size, arm, rows)
    if settings is None:
        return CellState(None, None, (), scores, (), (), waiting=arm.phase_from)
    default = settings[0]
    grid = list(study.lr_indices(arm))
    extended = {"low": 0, "high": 0}
    limit = study.extensions(arm)
    while True:
        missing = [k for k in grid if (study.lr(arm, task, k), default) not in scores]
        if missing:
            todo = tuple(("lr", k, default) for k in missing)
            return CellState(None, None, tuple(grid), scores, settings, todo)
        point = {k: (study.lr(arm, task, k), default) for k in grid}
        # the best validation metric; ties go to the smaller learning rate
        best = max(grid, key=lambda k: (study.better(scores[point[k]]), -k))
        near = {
            k: study.within_noise(
                scores[point[best]], scores[point[k]], (spread[point[best]], spread[point[k]])
            )
            for k in (grid[0], grid[-1])
        }
        if extended["high"] < limit and near[grid[-1]]:
            grid.append(grid[-1] + 1)
            extended["high"] += 1
        elif extended["low"] < limit and near[grid[0]]:
            grid.insert(0, grid[0] - 1)
            extended["low"] += 1
        else:
            break
    lr = study.lr(arm, task, best)
    missing_axis = [s for s in settings if (lr, s) not in scores]
    if missing_axis:
        todo = tuple(("axis", best, s) for s in missing_axis)
        return CellState(lr, None, tuple(grid), scores, settings, todo)
    # ties go to the earlier setting (the learning-rate search's default first)
    setting = max(settings, key=lambda s: (study.better(scores[(lr, s)]), -settings.index(s)))
    return CellState(lr, setting, tuple(grid), scores, settings, ())


def early_probe(
    study: Study,
    task: str,
    batch_size: int,
    arm: Arm,
    setting: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    tuning: bool,
) -> float | None:
    """The fraction of the run after which the early sharpness probe runs.

    An arm with a warm-up: the end of its own warm-up. Without one: the same step as its
    ``paired`` warm-up arm (that arm's default warm-up in tuning runs, its chosen warm-up in
    evaluation runs; ``None`` while that is not chosen yet).
    """
    if arm.start in ("warmup", "warmup-phase"):
        value = setting_value(setting, "warmup")
        assert value is not None
        return value
    paired = ARMS[arm.paired or "lars-warmup-cosine"]
    if tuning or paired.name not in study.arms[task]:
        return setting_value(paired.default, "warmup")
    chosen = cell_state(study, task, batch_size, paired, rows).setting
    return None if chosen is None else setting_value(chosen, "warmup")


def plan(study: Study, rows: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """Every run that can start now, given the finished ``rows``.

    Tuning points of a stage come once the previous stage of their cell is complete (every
    tuning seed); evaluation runs once the cell is tuned (and, for arms without a warm-up,
    once the paired warm-up arm is, for the early probe's step). Runs already in ``rows`` are
    left out. The order is the order of priority: the largest batch first (the question of
    the benchmark, and the cheapest runs), then task by task, so that a time budget cuts the
    least useful runs.
    """
    done = {row_key(r) for r in rows}
    todo: list[RunSpec] = []
    batch_sizes = sorted({b for t in study.tasks for b in study.batch_sizes[t]}, reverse=True)
    for batch_size in batch_sizes:
        for task in study.tasks:
            if batch_size in study.batch_sizes[task]:
                for name in study.arms[task]:
                    todo += _cell_plan(study, task, batch_size, ARMS[name], rows)
    return [spec for spec in todo if spec.key not in done]


def _cell_plan(
    study: Study, task: str, batch_size: int, arm: Arm, rows: Sequence[Mapping[str, Any]]
) -> list[RunSpec]:
    """The runs of one cell that its stage allows now (finished ones included)."""
    state = cell_state(study, task, batch_size, arm, rows)
    specs = []
    for stage, k, setting in state.todo:
        fraction = early_probe(study, task, batch_size, arm, setting, rows, tuning=True)
        assert fraction is not None
        lr = study.lr(arm, task, k)
        specs += [
            RunSpec(task, arm.name, batch_size, seed, "tune", stage, lr, setting, fraction)
            for seed in study.tune_seeds
        ]
    if state.setting is None or state.lr is None:
        return specs
    fraction = early_probe(study, task, batch_size, arm, state.setting, rows, tuning=False)
    if fraction is None:  # an arm without warm-up waiting for its paired warm-up arm
        return specs
    return specs + [
        RunSpec(task, arm.name, batch_size, seed, "eval", "eval", state.lr, state.setting, fraction)
        for seed in study.seeds
    ]


def run_count(study: Study, rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """How many runs the protocol takes, given the rows so far: ``(expected, at_most)``.

    ``expected`` counts each cell's grid as it stands (its extensions so far), its second axis
    and its evaluation seeds; ``at_most`` adds every extension still allowed."""
    expected = at_most = 0
    seeds = len(study.tune_seeds)
    for task in study.tasks:
        for batch_size in study.batch_sizes[task]:
            for name in study.arms[task]:
                arm = ARMS[name]
                state = cell_state(study, task, batch_size, arm, rows)
                grid = len(state.grid) or len(study.lr_indices(arm))
                cell = (grid + len(study.axis(arm)) - 1) * seeds + study.eval_seeds
                room = 0
                if state.lr is None:  # the search may still grow past an edge
                    room = 2 * study.extensions(arm) - (grid - len(study.lr_indices(arm)))
                expected += cell
                at_most += cell + room * seeds
    return expected, at_most
