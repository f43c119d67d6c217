"""The checks of ``lightning-tvlars compare`` before any run, and its timed probe.

:func:`check` builds the model and data once and validates the untrained model: what cannot be
compared is refused in one line before anything runs. :func:`probe` times a few steps of the
first run and one validation, for the estimate of the time the protocol takes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tvlars.bench.protocol import RunSpec
from lightning_tvlars.compare.options import CompareError, Monitor, Options, infer_mode
from lightning_tvlars.compare.run import ReturnedValues, replace_optimizers, validate
from lightning_tvlars.lightning.mixin import TVLARSMixin
from lightning_tvlars.lightning.sharpness import SharpnessProbe

#: Optimizer steps of the timed probe.
PROBE_STEPS = 10


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
    from lightning_tvlars.cli.parser import flag_error, names_its_argument, raising_section

    target = options.target
    first = options.batch_sizes[0] if options.batch_sizes else None
    pl.seed_everything(0, verbose=False)
    try:
        module, data, kwargs = target.build(first)
    except Exception as err:
        cause = err
        while isinstance(cause.__cause__, Exception):
            cause = cause.__cause__
        sections: dict[str, type] = {"data": pl.LightningDataModule, "model": pl.LightningModule}
        section = raising_section(cause, sections) or "model"
        message = " ".join(str(cause).split())
        if isinstance(cause, (ValueError, TypeError)) and names_its_argument(message):
            # a check of the class's own (batch_size=0 is invalid: ...): name the flag, as fit does
            raise CompareError(flag_error(section, message)) from None
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
        metrics = validate(trainer, module, data, returned)
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
        validate(trainer, module, data, returned)
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
