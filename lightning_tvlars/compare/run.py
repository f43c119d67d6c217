"""One run of ``lightning-tvlars compare`` through a Lightning Trainer.

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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_tvlars.bench.protocol import (
    ARMS,
    PROBE_FIELDS,
    SPEC_FIELDS,
    RunSpec,
    spec_columns,
)
from lightning_tvlars.bench.train import arm_config, code_version, sharpness_columns
from lightning_tvlars.compare.options import Monitor
from lightning_tvlars.compare.target import Target
from lightning_tvlars.lightning.configure import configure_tvlars
from lightning_tvlars.lightning.mixin import TVLARSMixin
from lightning_tvlars.lightning.run import run_facts
from lightning_tvlars.lightning.sharpness import SharpnessProbe

FIELDS = (
    *SPEC_FIELDS,
    "monitor",
    "initial_value",
    "value",
    "train_loss",
    "epochs",
    "steps",
    "converged",
    "diverged",
    *PROBE_FIELDS,
    "wall_seconds",
    "device",
    "devices",
    "model_params",
    "setup",
    "code_version",
)
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


def validate(
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
        initial = _value(validate(trainer, module, data, returned), monitor.name)
    trainer.fit(module, datamodule=data)
    final = _value(validate(trainer, module, data, returned), monitor.name)
    diverged = loss.diverged or not math.isfinite(final)
    converged = not diverged and monitor.better(final, initial)
    history = probe.history if probe is not None else []
    early = next((r for r in history if r.step == plan.early_step), None)
    end = history[-1] if history and history[-1].step == trainer.global_step else None
    row = {
        **spec_columns(spec),
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
