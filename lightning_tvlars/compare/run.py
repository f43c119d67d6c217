"""One run of ``lightning-tvlars compare``, the checks before any run, and the timed probe.

A run (:func:`train`) seeds everything with the run's seed (Lightning's ``seed_everything``:
the same seed gives the same initial weights and data order in every arm), builds fresh
instances (:meth:`~lightning_tvlars.compare.target.Target.build`), replaces the module's
``configure_optimizers`` by the arm's recipe (:func:`~lightning_tvlars.bench.train.arm_config`
through :func:`~lightning_tvlars.configure_tvlars`, planned for the run's real length),
measures the monitored validation metric before training (with the random state restored
after it) and after it (the final weights: no best-epoch picking), and returns the CSV row.

A run is *diverged* when the mean training loss of an epoch (what ``training_step`` returns)
or the final metric is not finite; such a run stops at the end of that epoch. It has
*converged* when it did not diverge and its final metric is better than the same seed's
untrained model's.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_tvlars.bench.protocol import ARMS, RunSpec
from lightning_tvlars.bench.train import arm_config, code_version, sharpness_columns
from lightning_tvlars.compare.options import CompareError, Monitor, Options, infer_mode
from lightning_tvlars.compare.target import Target
from lightning_tvlars.lightning.configure import configure_tvlars
from lightning_tvlars.lightning.mixin import TVLARSMixin
from lightning_tvlars.lightning.run import run_facts
from lightning_tvlars.lightning.sharpness import SharpnessProbe

FIELDS = (
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
    "monitor",
    "initial_value",
    "value",
    "train_loss",
    "epochs",
    "steps",
    "converged",
    "diverged",
    "early_step",
    "early_loss",
    "early_top_eigenvalue",
    "early_trace",
    "early_filter_normalized",
    "end_loss",
    "end_top_eigenvalue",
    "end_trace",
    "end_filter_normalized",
    "probe_seconds",
    "wall_seconds",
    "device",
    "devices",
    "model_params",
    "setup",
    "code_version",
)
#: Optimizer steps of the timed probe.
PROBE_STEPS = 10
#: Name of the value a ``validation_step`` returns (``validation_step.KEY`` for a mapping's).
RETURNED = "validation_step"


# ------------------------------------------------------------------------------ callbacks


class TrainingLoss(pl.Callback):
    """The mean training loss of the last epoch (what ``training_step`` returns: a tensor or
    a mapping's ``"loss"``), summed on the device; one host read per epoch. A non-finite mean
    marks the run diverged and stops it."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0
        self.last = math.nan
        self.diverged = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total, self.count = None, 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            loss = loss.detach().float()
            self.total = loss if self.total is None else self.total + loss
            self.count += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.total is None or not self.count:
            return
        self.last = float(self.total) / self.count
        self.total, self.count = None, 0
        if not math.isfinite(self.last):
            self.diverged = True
            trainer.should_stop = True


class ReturnedValues(pl.Callback):
    """The validation epoch's means of the scalar tensors ``validation_step`` returns:
    ``validation_step`` for a tensor, ``validation_step.KEY`` for a mapping's entries (the
    mean over batches, of this process's batches under a distributed strategy)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sums, self.counts = {}, {}

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, Tensor):
            items: Mapping[str, Any] = {RETURNED: outputs}
        elif isinstance(outputs, Mapping):
            items = {f"{RETURNED}.{key}": value for key, value in outputs.items()}
        else:
            return
        for name, value in items.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.detach().float()
                self.sums[name] = self.sums[name] + value if name in self.sums else value
                self.counts[name] = self.counts.get(name, 0) + 1

    def values(self) -> dict[str, float]:
        return {name: float(total) / self.counts[name] for name, total in self.sums.items()}


class _Clock(pl.Callback):
    """Times the first ``steps`` training batches, then stops the fit (the probe)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.start = time.perf_counter()
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) >= self.steps:
            trainer.should_stop = True


# ------------------------------------------------------------------------------ the recipe


@dataclass
class _Plan:
    """What the arm's ``configure_optimizers`` learnt of the run."""

    total_steps: int = 0
    early_step: int = 0
    batch_size: int = 0
    steps_per_epoch: int = 0


def _arm_optimizers(
    module: pl.LightningModule,
    spec: RunSpec,
    base: Any,
    plan: _Plan,
    probe: SharpnessProbe | None,
) -> dict[str, Any]:
    """The arm's recipe, as ``module.configure_optimizers`` (planned for the run's length)."""
    trainer = module.trainer
    facts = run_facts(trainer)
    if facts.total_steps is None:
        raise ValueError(
            "the run's length in optimizer steps is unknown (data without a length?): give "
            "the budget as --steps"
        )
    plan.total_steps = facts.total_steps
    plan.batch_size = facts.per_device_batch_size
    plan.steps_per_epoch = facts.steps_per_epoch[0] if facts.steps_per_epoch else 0
    plan.early_step = min(facts.total_steps, round(spec.probe_fraction * facts.total_steps))
    if probe is not None:
        probe.at_steps = frozenset({plan.early_step})
    config = arm_config(ARMS[spec.arm], spec, facts.total_steps, base)
    return configure_tvlars(module, config)


def replace_optimizers(
    module: pl.LightningModule, spec: RunSpec, probe: SharpnessProbe | None = None
) -> _Plan:
    """Give ``module`` the arm's recipe as its ``configure_optimizers`` (this instance only).
    A :class:`~lightning_tvlars.TVLARSMixin` module's parameter choices and weight decay
    (:data:`~lightning_tvlars.bench.train.MODEL_FIELDS`) are kept."""
    base = module.tvlars_config if isinstance(module, TVLARSMixin) else None
    plan = _Plan()
    module.configure_optimizers = functools.partial(  # type: ignore[method-assign,assignment]
        _arm_optimizers, module, spec, base, plan, probe
    )
    return plan


# ------------------------------------------------------------------------------ one run


def _validate(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    data: pl.LightningDataModule | None,
    returned: ReturnedValues,
) -> dict[str, float]:
    """Every validation metric of the module now: logged ones, then returned ones."""
    metrics: dict[str, float] = {}
    for results in trainer.validate(module, datamodule=data, verbose=False):
        metrics.update({name: float(value) for name, value in results.items()})
    metrics.update(returned.values())
    return metrics


def _value(metrics: Mapping[str, float], name: str) -> float:
    if name not in metrics:
        raise ValueError(
            f"--monitor {name}: not among the validation metrics of this run "
            f"({', '.join(metrics) or 'none'})"
        )
    return metrics[name]


def train(spec: RunSpec, *, target: Target, monitor: Monitor, sharpness: bool) -> dict[str, Any]:
    """Train one run and return its CSV row (:data:`FIELDS`); see the module docstring."""
    assert monitor.name is not None and monitor.mode is not None
    start = time.perf_counter()
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    module, data, kwargs = target.build(spec.batch_size if target.batch_size_owner else None)
    probe = SharpnessProbe(at_steps=(), at_end=True, seed=0) if sharpness else None
    plan = replace_optimizers(module, spec, probe)
    loss, returned = TrainingLoss(), ReturnedValues()
    ours: list[pl.Callback] = [loss, returned] + ([probe] if probe is not None else [])
    trainer = pl.Trainer(**{**kwargs, "callbacks": [*kwargs["callbacks"], *ours]})
    with isolate_rng():  # the untrained model's metric, without moving any random state
        initial = _value(_validate(trainer, module, data, returned), monitor.name)
    trainer.fit(module, datamodule=data)
    final = _value(_validate(trainer, module, data, returned), monitor.name)
    diverged = loss.diverged or not math.isfinite(final)
    converged = not diverged and monitor.better(final, initial)
    history = probe.history if probe is not None else []
    early = next((r for r in history if r.step == plan.early_step), None)
    end = history[-1] if history and history[-1].step == trainer.global_step else None
    arm = ARMS[spec.arm]
    row = {
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
        "monitor": str(monitor),
        "initial_value": f"{initial:.6g}",
        "value": f"{final:.6g}",
        "train_loss": f"{loss.last:.6g}",
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "converged": int(converged),
        "diverged": int(diverged),
        "early_step": plan.early_step,
        **sharpness_columns("early", early),
        **sharpness_columns("end", end),
        "probe_seconds": f"{sum(r.seconds for r in history):.2f}",
        "wall_seconds": f"{time.perf_counter() - start:.2f}",
        "device": trainer.strategy.root_device.type,
        "devices": trainer.world_size,
        "model_params": sum(p.numel() for p in module.parameters()),
        "setup": target.fingerprint,
        "code_version": code_version(),
    }
    # every process of a distributed run plans the next run from rank 0's row
    shared: dict[str, Any] = trainer.strategy.broadcast(row, src=0)
    return shared


# ------------------------------------------------------------------------------ before running


@dataclass(frozen=True)
class Check:
    """What the checks before any run found.

    Attributes:
        monitor: the metric selection reads, with its mode.
        metrics: every validation metric of the untrained model (logged ones first).
        batch_size: the first cell's per-device batch size (the loaders' own when compare
            does not set it).
        world_size: processes of each run (the trainer's strategy).
        mixin: the module is a :class:`~lightning_tvlars.TVLARSMixin` (its parameter choices
            and weight decay are kept).
    """

    monitor: Monitor
    metrics: Mapping[str, float]
    batch_size: int
    world_size: int
    mixin: bool


class _CountedError(Exception):
    """Ends the check fit once the module's optimizers are counted."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def count_optimizers(configured: Any) -> int:
    """The optimizers in what a ``configure_optimizers`` returned (Lightning's forms)."""
    if configured is None:
        return 0
    if isinstance(configured, (torch.optim.Optimizer, Mapping)):
        return 1
    if isinstance(configured, (list, tuple)):
        if (
            len(configured) == 2
            and isinstance(configured[0], (list, tuple))
            and isinstance(configured[1], (list, tuple))
        ):
            return len(configured[0])  # ([optimizers], [schedulers])
        return sum(count_optimizers(item) for item in configured)
    return 1


def _error(what: str, err: BaseException) -> CompareError:
    return CompareError(f"{what}: {type(err).__name__}: {' '.join(str(err).split())}")


def _own_optimizers(module: pl.LightningModule, kwargs: dict[str, Any], data: Any) -> int:
    """How many optimizers the module's own ``configure_optimizers`` returns, called inside a
    fit (it may need the trainer) that stops right after it."""
    own = module.configure_optimizers

    def counting() -> Any:
        raise _CountedError(count_optimizers(own()))

    module.configure_optimizers = counting  # type: ignore[method-assign]
    try:
        pl.Trainer(**kwargs).fit(module, datamodule=data)
    except _CountedError as counted:
        return counted.count
    finally:
        del module.configure_optimizers
    return 0


def check(options: Options) -> Check:
    """Build the model and data and validate the untrained model once, and refuse in one line
    what cannot be compared: a model or data that cannot be built, manual optimization with
    several optimizers (or with ``--sharpness``), no validation metric to select on (or not the
    one ``--monitor`` names, or one whose mode its name does not say), ``--sharpness`` on a
    strategy the probe cannot measure."""
    from lightning_tvlars.cli.fit import _raising_section

    target = options.target
    first = options.batch_sizes[0] if options.batch_sizes else None
    pl.seed_everything(0, verbose=False)
    try:
        module, data, kwargs = target.build(first)
    except Exception as err:
        cause = err
        while isinstance(cause.__cause__, Exception):
            cause = cause.__cause__
        section = _raising_section(cause) or "model"
        raise _error(f"--{section} could not be built", cause) from None
    name = type(module).__name__
    if not module.automatic_optimization:
        if options.sharpness:
            raise CompareError(
                f"--sharpness: {name} uses manual optimization, whose training_step steps the "
                "optimizer: sharpness cannot be measured with it; leave --sharpness out"
            )
        try:
            count = _own_optimizers(module, kwargs, data)
        except Exception as err:
            raise _error(f"{name}.configure_optimizers could not be checked", err) from None
        if count > 1:
            raise CompareError(
                f"--model {name} cannot be compared: it uses manual optimization with {count} "
                "optimizers, and each arm is one optimizer recipe; compare one network's "
                "optimizer at a time (a module that trains only it), or use the arms' "
                "TVLARSConfig in your configure_optimizers with lightning-tvlars fit"
            )
        module, data, kwargs = target.build(first)
    returned = ReturnedValues()
    trainer = pl.Trainer(**{**kwargs, "callbacks": [*kwargs["callbacks"], returned]})
    try:
        metrics = _validate(trainer, module, data, returned)
    except Exception as err:
        raise _error(f"validating {name} failed", err) from None
    monitor = _resolve(options.monitor, metrics, returned.values(), name)
    if options.sharpness:
        try:  # the probe's own refusals (sharded strategies), before any run
            SharpnessProbe().setup(trainer, module, "fit")
        except ValueError as err:
            raise CompareError(f"--sharpness: {err}") from None
    return Check(monitor, metrics, first or 0, trainer.world_size, isinstance(module, TVLARSMixin))


def _resolve(
    monitor: Monitor, metrics: Mapping[str, float], returned: Mapping[str, float], name: str
) -> Monitor:
    """The metric to select on and its mode, or a one-line refusal saying how to give one."""
    logged = [m for m in metrics if m not in returned]
    if monitor.name is None:
        if not logged:
            hint = (
                f"; its validation_step returns {', '.join(returned)}: select on "
                f"--monitor {next(iter(returned))}:min (or :max)"
                if returned
                else ""
            )
            raise CompareError(
                f"--monitor: {name} logs no validation metric (self.log in validation_step) "
                f"to select on{hint}, or log one and name it with --monitor NAME[:max|min]"
            )
        monitor = Monitor(logged[0], monitor.mode)
    assert monitor.name is not None
    if monitor.name not in metrics:
        raise CompareError(
            f"--monitor={monitor.name} is invalid: {name}'s validation gives "
            f"{', '.join(metrics) or 'no metric'}"
        )
    mode = monitor.mode or infer_mode(monitor.name)
    if mode is None:
        raise CompareError(
            f"--monitor {monitor.name}: its name does not say whether larger is better: give "
            f"--monitor {monitor.name}:max or --monitor {monitor.name}:min"
        )
    return Monitor(monitor.name, mode)


@dataclass(frozen=True)
class Timing:
    """The timed probe: a few steps of the first arm, and one validation.

    Attributes:
        setup: seconds from the start of ``fit`` to the end of the first step, less one step.
        step: seconds per optimizer step (the median after the first).
        validation: seconds of one validation (``Trainer.validate``).
        total_steps: optimizer steps of a run; batch_size: the per-device batch size.
        validations: validations per run (during training, and the two ``compare`` adds).
    """

    setup: float
    step: float
    validation: float
    total_steps: int
    batch_size: int
    validations: int

    @property
    def run_seconds(self) -> float:
        """About how long one run takes."""
        return self.setup + self.total_steps * self.step + self.validations * self.validation


def probe(options: Options, spec: RunSpec) -> Timing:
    """Time ``spec``'s first :data:`PROBE_STEPS` steps and one validation (see
    :class:`Timing`); the probe's result is not a row."""
    target = options.target
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    sets = target.batch_size_owner is not None and spec.batch_size > 0
    module, data, kwargs = target.build(spec.batch_size if sets else None)
    plan = replace_optimizers(module, spec)
    clock, returned = _Clock(PROBE_STEPS), ReturnedValues()
    trainer = pl.Trainer(**{**kwargs, "callbacks": [*kwargs["callbacks"], clock, returned]})
    try:
        trainer.fit(module, datamodule=data)
        started = time.perf_counter()
        _validate(trainer, module, data, returned)
    except Exception as err:
        raise _error(f"the probe run of {spec.arm} failed", err) from None
    validation = time.perf_counter() - started
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    step = statistics.median(steps) if steps else clock.ends[0] - clock.start
    epochs = math.ceil(plan.total_steps / max(1, plan.steps_per_epoch or plan.total_steps))
    every = kwargs.get("check_val_every_n_epoch") or 1
    return Timing(
        setup=max(0.0, clock.ends[0] - clock.start - step),
        step=step,
        validation=validation,
        total_steps=plan.total_steps,
        batch_size=plan.batch_size,
        validations=epochs // every + 2,
    )
