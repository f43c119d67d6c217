"""The command line of ``lightning-tvlars compare``: LightningCLI's sections and the protocol's
options, each checked before anything runs, each error in one line naming the flag.

``--model`` (required) and ``--data`` take class paths and ``--model.*``, ``--data.*``,
``--trainer.*`` their arguments, as ``lightning-tvlars fit`` and any LightningCLI do; every
option is also a YAML key of ``--config`` files (``arms: [tvlars, lars-warmup-cosine]``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, Namespace
from lightning.pytorch.callbacks import (
    DeviceStatsMonitor,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    Timer,
)
from lightning.pytorch.cli import LightningArgumentParser

from lightning_tvlars.bench.protocol import ARMS, DEFAULT_CENTER, Mode, Study
from lightning_tvlars.cli.parser import one_line_error
from lightning_tvlars.compare.target import (
    Budget,
    Target,
    add_lightning_arguments,
    import_class,
    takes,
)

PROG = "lightning-tvlars compare"
#: The default arms: TVLARS as published against the usual large-batch LARS recipe.
DEFAULT_ARMS = ("tvlars", "lars-warmup-cosine")
#: The budget when neither the options nor the trainer's settings give one (``fit``'s).
DEFAULT_EPOCHS = 5
#: The arms compare offers: the package's recipes (lightly's LARS is the benchmark's external
#: reference, not a recipe of this package).
ARM_NAMES = tuple(name for name, arm in ARMS.items() if arm.optimizer in ("lars", "lamb"))
#: Second-axis values tuned per arm (the CPU benchmark's).
AXIS_SIZE = 3

#: Words of a metric's name that say which way is better (``val/acc``: max, ``val_loss``: min).
MAX_WORDS = frozenset(
    {"acc", "accuracy", "top1", "top5", "f1", "auc", "auroc", "ap", "map", "precision"}
    | {"recall", "iou", "miou", "dice", "bleu", "rouge", "r2", "psnr", "ssim"}
)
MIN_WORDS = frozenset(
    {"loss", "error", "err", "mse", "mae", "rmse", "nll", "perplexity", "ppl", "wer", "cer"}
    | {"fid", "bpd", "distance"}
)


class CompareError(Exception):
    """A command line that ``compare`` refuses, phrased for the user in one line."""


@dataclass(frozen=True)
class Monitor:
    """The validation metric selection reads.

    Attributes:
        name: a metric the module logs with ``self.log`` during validation, or
            ``validation_step.KEY`` (``validation_step``: a returned tensor), the mean of what
            ``validation_step`` returns; ``None``: the first metric the module logs.
        mode: ``max`` or ``min``; ``None``: from the name (:func:`infer_mode`).
    """

    name: str | None = None
    mode: Mode | None = None

    def __str__(self) -> str:
        return f"{self.name or '?'}:{self.mode or '?'}"

    def better(self, value: float, than: float) -> bool:
        """Whether ``value`` is strictly better than ``than``."""
        return value > than if self.mode == "max" else value < than


def infer_mode(name: str) -> Mode | None:
    """``max`` or ``min`` when the words of ``name`` say it (accuracy, loss, ...), else
    ``None``."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    up, down = bool(words & MAX_WORDS), bool(words & MIN_WORDS)
    if up == down:
        return None
    return "max" if up else "min"


def parse_monitor(text: str | None) -> Monitor:
    """``NAME``, ``NAME:max`` or ``NAME:min`` (``None``: the module's first logged metric)."""
    if text is None:
        return Monitor()
    name, colon, mode = text.rpartition(":")
    if not colon or mode not in ("max", "min"):
        name, mode = text, ""
    if not name:
        raise CompareError(
            f"--monitor={text} is invalid: expected NAME, NAME:max or NAME:min (a validation "
            "metric)"
        )
    return Monitor(name, mode or infer_mode(name))  # type: ignore[arg-type]


def parse_lr_grid(tokens: Sequence[str] | None) -> dict[str, tuple[float, ...]]:
    """``--lr-grid`` as explicit base rates per optimizer family.

    Each token is a rate for every arm (``0.5``), or ``FAMILY=RATE,RATE,...`` for the arms of
    one family (``lars=0.3,1,3``, ``lamb=0.003,0.01``); rates are rounded to 4 significant
    digits (the CSV's) and sorted.
    """
    if not tokens:
        return {}
    common: list[float] = []
    families: dict[str, list[float]] = {}
    for token in tokens:
        family, equals, values = token.rpartition("=")
        if equals and family not in DEFAULT_CENTER:
            raise CompareError(
                f"--lr-grid {token} is invalid: expected RATE or FAMILY=RATE,... with FAMILY "
                f"one of {', '.join(sorted(DEFAULT_CENTER))}"
            )
        rates = []
        for part in values.split(","):
            try:
                rate = float(part)
            except ValueError:
                rate = math.nan
            if not (math.isfinite(rate) and rate > 0):
                raise CompareError(
                    f"--lr-grid {token} is invalid: {part!r} is not a learning rate (a finite "
                    "number > 0)"
                )
            rates.append(float(f"{rate:.4g}"))
        (families.setdefault(family, []) if equals else common).extend(rates)
    grid = {family: tuple(sorted(set(common))) for family in DEFAULT_CENTER if common}
    grid.update({family: tuple(sorted(set(rates))) for family, rates in families.items()})
    return grid


def build_parser() -> LightningArgumentParser:
    """The parser of ``lightning-tvlars compare`` (``--help`` lists every option)."""
    parser = LightningArgumentParser(
        prog=PROG,
        exit_on_error=False,
        description=(
            "Does TVLARS help on my model? Runs the accuracy benchmark's protocol on any "
            "LightningModule: every arm (an optimizer recipe that replaces the module's "
            "configure_optimizers) gets the same learning-rate grid and second-axis tuning on "
            "the validation metric, then fresh seeds; the report gives Welch intervals and "
            "Holm-corrected verdicts."
        ),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of options")
    add_lightning_arguments(parser)
    parser.add_argument(
        "--arms",
        type=str,
        nargs="+",
        default=list(DEFAULT_ARMS),
        help=f"the recipes compared, of: {', '.join(ARM_NAMES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="per-device batch sizes, each set as the batch_size init argument of --data (of "
        "--model without --data); default: the one configured, or the loaders' own",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs of every run (default: the trainer's max_epochs/max_steps, else "
        f"{DEFAULT_EPOCHS})",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps of every run (not with --epochs)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=8,
        help="fresh evaluation seeds per arm and batch size (default: %(default)s)",
    )
    parser.add_argument(
        "--tune-seeds",
        type=int,
        default=2,
        help="seeds 0..N-1, on whose mean every tuning point is selected (default: %(default)s)",
    )
    parser.add_argument(
        "--lr-grid",
        type=str,
        nargs="+",
        default=None,
        help="explicit base learning rates (at batch 256): RATE for every arm or FAMILY=RATE,"
        "... (lars, lamb), not extended; default: 5 points a quarter decade apart around "
        "LARS 1.0 / LAMB 0.01, extended past an edge that is the best or within the noise",
    )
    parser.add_argument(
        "--monitor",
        type=str,
        default=None,
        help="the validation metric to select on, NAME[:max|min]: a metric logged in "
        "validation, or validation_step.KEY (the mean of what validation_step returns); "
        "default: the first one logged, its mode from its name",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel worker processes (default: 1)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no run after this many minutes, then report what is there (resumable)",
    )
    parser.add_argument(
        "--out", type=str, default="compare", help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--sharpness",
        type=bool,
        default=False,
        help="measure sharpness at the end of the warm-up and of training (SharpnessProbe)",
    )
    return parser


@dataclass(frozen=True)
class Options:
    """A checked command line (see :func:`parse`)."""

    target: Target
    arms: tuple[str, ...]
    batch_sizes: tuple[int, ...] | None
    seeds: int
    tune_seeds: int
    lr_points: Mapping[str, tuple[float, ...]]
    monitor: Monitor
    jobs: int
    max_minutes: float | None
    out: Path
    sharpness: bool
    notes: tuple[str, ...] = ()

    def study(self, batch_sizes: Sequence[int], monitor: Monitor) -> Study:
        """The protocol on this target: one task, the metric column ``value``."""
        task = self.target.task
        return Study(
            tasks=(task,),
            batch_sizes={task: tuple(batch_sizes)},
            arms={task: self.arms},
            lr_points=dict(self.lr_points),
            axis_size=AXIS_SIZE,
            tune_seeds=tuple(range(self.tune_seeds)),
            eval_seeds=self.seeds,
            metric="value",
            mode=monitor.mode or "max",
        )


_OWN_OPTIONS = ("batch_sizes", "tune_seeds", "lr_grid", "max_minutes")


def _flag_names(message: str) -> str:
    """jsonargparse names our options by their destination (``--batch_sizes``): use the
    flags' spelling."""
    for name in _OWN_OPTIONS:
        message = message.replace(f"--{name}", f"--{name.replace('_', '-')}")
    return message


def one_line(message: str) -> str:
    """jsonargparse's report of a bad command line, in one line naming the flag."""
    return _flag_names(one_line_error(message))


def _at_least(flag: str, value: int | float | None, minimum: float, what: str) -> None:
    if value is not None and not value >= minimum:
        raise CompareError(f"--{flag}={value} is invalid: expected {what}")


def _section(cfg: Namespace, key: str) -> dict[str, Any]:
    value = cfg.get(key)
    return value.as_dict() if isinstance(value, Namespace) else dict(value or {})


#: Callbacks left out of the runs, which write no checkpoints, logs or progress bars.
LEFT_OUT = (ModelCheckpoint, ProgressBar, LearningRateMonitor, DeviceStatsMonitor)


def _callbacks(trainer: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """The trainer's callbacks without :data:`LEFT_OUT` (and ``TVLARSMonitor``), refusing
    those that would give the arms different budgets."""
    from lightning_tvlars.lightning.monitor import TVLARSMonitor

    kept, notes = [], []
    callbacks = trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        path = callback.get("class_path", "") if isinstance(callback, dict) else ""
        cls = import_class(path) if path else type(callback)
        if issubclass(cls, (EarlyStopping, Timer)):
            raise CompareError(
                f"--trainer.callbacks={cls.__name__} is invalid: it would end the arms' runs at "
                "different steps; compare gives every run the same budget (--epochs, --steps): "
                "remove it"
            )
        if issubclass(cls, (*LEFT_OUT, TVLARSMonitor)):
            notes.append(
                f"the trainer's {cls.__name__} is left out: the runs write no checkpoints, logs "
                "or progress bars"
            )
            continue
        kept.append(callback)
    return kept, notes


def _budget(options: Namespace, trainer: dict[str, Any]) -> Budget:
    """``--epochs`` or ``--steps``, else the trainer's own, else :data:`DEFAULT_EPOCHS`."""
    if options.epochs is not None and options.steps is not None:
        raise CompareError(
            f"--epochs={options.epochs} and --steps={options.steps} are both given: expected "
            "one budget for every run"
        )
    _at_least("epochs", options.epochs, 1, "an integer >= 1")
    _at_least("steps", options.steps, 1, "an integer >= 1")
    if trainer.get("max_time") is not None:
        raise CompareError(
            f"--trainer.max_time={trainer['max_time']} is invalid here: a time limit ends the "
            "arms' runs at different steps; give the budget as --epochs or --steps"
        )
    if trainer.get("fast_dev_run"):
        raise CompareError(
            f"--trainer.fast_dev_run={trainer['fast_dev_run']} is invalid here: compare sets "
            "the budget itself (--epochs, --steps); remove it"
        )
    if options.steps is not None:
        return ("steps", options.steps)
    if options.epochs is not None:
        return ("epochs", options.epochs)
    if trainer.get("max_steps") not in (None, -1):
        return ("steps", int(trainer["max_steps"]))
    if trainer.get("max_epochs") not in (None, -1):
        return ("epochs", int(trainer["max_epochs"]))
    return ("epochs", DEFAULT_EPOCHS)


def _batch_size_owner(
    batch_sizes: Sequence[int] | None, model: str, data: str | None
) -> tuple[str | None, list[str]]:
    """Which section takes ``batch_size``; refuses ``--batch-sizes`` when none does."""
    owner, path = ("data", data) if data else ("model", model)
    if takes(import_class(path), "batch_size"):
        return owner, []
    if batch_sizes is None:
        return None, []
    name = path.rpartition(".")[2]
    raise CompareError(
        f"--batch-sizes {' '.join(map(str, batch_sizes))}: {name} takes no batch_size argument, "
        f"so compare cannot set its batch size; give {name}.__init__ a batch_size argument "
        "that its train_dataloader uses, or leave --batch-sizes out to compare at the batch "
        "size of its own loaders"
    )


def parse(argv: Sequence[str]) -> Options:
    """Read and check the command line; nothing is built or run.

    Raises:
        CompareError: a bad option, in one line.
    """
    parser = build_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as err:
        raise CompareError(one_line(str(err))) from None
    arms = tuple(dict.fromkeys(cfg.arms))
    unknown = [a for a in arms if a not in ARM_NAMES]
    if unknown:
        raise CompareError(
            f"--arms {' '.join(unknown)}: unknown arm{'s' if len(unknown) > 1 else ''}; "
            f"expected some of {', '.join(ARM_NAMES)}"
        )
    for arm in arms:
        source = ARMS[arm].phase_from
        if source is not None and source not in arms:
            raise CompareError(f"--arms {arm} takes the phase chosen for {source}: add {source}")
    if len(arms) < 2:
        raise CompareError(f"--arms {' '.join(arms)}: expected at least two arms to compare")
    batch_sizes = tuple(dict.fromkeys(cfg.batch_sizes)) if cfg.batch_sizes else None
    for size in batch_sizes or ():
        _at_least("batch-sizes", size, 1, "integers >= 1")
    _at_least("seeds", cfg.seeds, 2, "an integer >= 2 (an interval needs two runs per arm)")
    _at_least("tune-seeds", cfg.tune_seeds, 1, "an integer >= 1")
    _at_least("jobs", cfg.jobs, 1, "an integer >= 1")
    _at_least("max-minutes", cfg.max_minutes, 0, "a number >= 0")
    lr_points = parse_lr_grid(cfg.lr_grid)
    monitor = parse_monitor(cfg.monitor)
    dumped = yaml.safe_load(parser.dump(cfg, skip_check=True))
    sections = {key: dumped.get(key) for key in ("model", "data", "trainer")}
    trainer = dict(sections["trainer"] or {})
    callbacks, notes = _callbacks(trainer)
    budget = _budget(cfg, trainer)
    trainer.update(callbacks=callbacks or None, max_epochs=-1, max_steps=-1)
    trainer["max_epochs" if budget[0] == "epochs" else "max_steps"] = budget[1]
    sections["trainer"] = trainer
    model, data = sections["model"], sections["data"]
    owner, more = _batch_size_owner(
        batch_sizes, model["class_path"], data["class_path"] if data else None
    )
    target = Target(json.dumps(sections), owner, budget)  # type: ignore[arg-type]
    return Options(
        target=target,
        arms=arms,
        batch_sizes=batch_sizes,
        seeds=cfg.seeds,
        tune_seeds=cfg.tune_seeds,
        lr_points=lr_points,
        monitor=monitor,
        jobs=cfg.jobs,
        max_minutes=cfg.max_minutes,
        out=Path(cfg.out),
        sharpness=bool(cfg.sharpness),
        notes=tuple(notes + more),
    )
