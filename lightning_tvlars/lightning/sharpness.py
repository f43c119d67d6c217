"""``SharpnessProbe``: measure the sharpness of the loss on a fixed batch during training.

At scheduled optimizer steps the probe runs :func:`lightning_tvlars.sharpness.measure_sharpness`
on the LightningModule (not the DDP wrapper) with a batch captured once at fit start, logs the
results to every logger of the trainer at ``trainer.global_step`` and appends a
:class:`~lightning_tvlars.sharpness.SharpnessReport` to ``probe.history``.

Metrics::

    tvlars/sharpness/top_eigenvalue         dominant Hessian eigenvalue (power iteration)
    tvlars/sharpness/trace                  Hutchinson estimate of the Hessian trace
    tvlars/sharpness/trace_stderr           its standard error (trace_samples > 1)
    tvlars/sharpness/filter_normalized      mean L(w +- r d) - L(w), filter-normalized d
    tvlars/sharpness/filter_normalized_max  the largest of those increases
    tvlars/sharpness/loss                   L(w) on the probe batch (eval mode)
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_tvlars._validation import check_choice, check_positive, check_positive_int
from lightning_tvlars.recipe import deepspeed_zero_stage
from lightning_tvlars.sharpness import (
    MEASURES,
    BatchNormStatistics,
    SharpnessReport,
    _check_measures,
    _check_seed,
    measure_sharpness,
)

LossFn = Callable[[pl.LightningModule, Any], Tensor]


def training_step_loss(module: pl.LightningModule, batch: Any) -> Tensor:
    """The default loss of :class:`SharpnessProbe`: ``module.training_step(batch, 0)``.

    Accepts a tensor or a mapping with a ``"loss"`` entry, as Lightning does.
    """
    out = module.training_step(batch, 0)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{type(module).__name__}.training_step returned {type(out).__name__}: "
            "SharpnessProbe needs a loss tensor or a dict with a 'loss' tensor; pass "
            "loss_fn=lambda module, batch: ... to compute the loss another way"
        )
    return out


@contextlib.contextmanager
def _quiet(module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` are no-ops and torchmetrics states are restored."""

    def _no_log(*args: object, **kwargs: object) -> None:
        return None

    names = ("log", "log_dict")
    shadowed = {name: module.__dict__[name] for name in names if name in module.__dict__}
    metrics = _metric_states(module)
    for name in names:
        module.__dict__[name] = _no_log
    try:
        yield
    finally:
        for name in names:
            if name in shadowed:
                module.__dict__[name] = shadowed[name]
            else:
                del module.__dict__[name]
        for metric, state in metrics:
            for attr, value in state.items():
                setattr(metric, attr, value)


_METRIC_FLAGS = ("_update_count", "_forward_cache", "_computed", "_cache", "_is_synced")


def _metric_states(module: torch.nn.Module) -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """Copies of every torchmetrics ``Metric`` state, so that a probe's updates can be undone."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency of Lightning
        return []
    saved: list[tuple[torch.nn.Module, dict[str, Any]]] = []
    for m in module.modules():
        if isinstance(m, Metric):
            state: dict[str, Any] = dict(m._copy_state_dict())
            state.update({flag: getattr(m, flag) for flag in _METRIC_FLAGS if hasattr(m, flag)})
            saved.append((m, state))
    return saved


def _num_samples(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if (n := _num_samples(item)) is not None:
                return n
    return None


def _concat(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {key: _concat([b[key] for b in batches]) for key in first}
    if isinstance(first, (list, tuple)):
        parts = [_concat(list(items)) for items in zip(*batches, strict=True)]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    raise TypeError(
        f"SharpnessProbe cannot concatenate batches holding {type(first).__name__}; pass "
        "batch=... or num_samples <= the loader's batch size"
    )


def _take(batch: Any, n: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[:n] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return {key: _take(value, n) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        parts = [_take(item, n) for item in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


class SharpnessProbe(pl.Callback):
    """Measure the sharpness of the training loss on a fixed batch at scheduled steps.

    The measures are those of :func:`lightning_tvlars.sharpness.measure_sharpness`: the dominant
    Hessian eigenvalue, a Hutchinson estimate of the Hessian trace and the filter-normalized
    random-direction loss increase. The module is in eval mode during a probe (BatchNorm uses
    and keeps its running statistics), ``p.grad`` is left as it was and the weights are
    restored bit for bit, so training continues exactly as without the probe.

    The fixed batch is captured once, at fit start: ``num_samples`` samples drawn without
    replacement from the training data set with a generator seeded by ``seed`` (the same
    samples on every rank and in every run with the same data), collated by the training
    loader's ``collate_fn``; for an iterable data set, the first ``num_samples`` samples the
    loader yields. The global random state (torch, CUDA, numpy, ``random``) is the same
    afterwards, so random transforms in the data set are seeded and training draws the same
    numbers as without the probe. The batch then goes through the module's batch-transfer hooks
    like a training batch. A ``batch`` you pass goes through the same hooks instead.

    The loss is ``loss_fn(module, batch)``, by default ``module.training_step(batch, 0)`` (a
    tensor or a dict with ``"loss"``). During a probe ``self.log`` and ``self.log_dict`` are
    no-ops and the state of every torchmetrics ``Metric`` of the module is restored afterwards;
    any other side effect of ``training_step`` (counters, collectives, optimizer calls) is
    yours: pass ``loss_fn`` when ``training_step`` has such effects. Manual optimization
    requires ``loss_fn``.

    The probe runs on global rank 0 only, with rank 0's copy of the module and no collective:
    under DDP the other ranks wait for it at the next gradient all-reduce (keep probes shorter
    than the process-group timeout). ``history`` is filled on rank 0 only. Sharded strategies
    (FSDP, ``ModelParallelStrategy``, DeepSpeed ZeRO) are refused: their parameters are shards.

    Args:
        every_n_steps: measure when ``trainer.global_step`` is a positive multiple of this.
        at_steps: also measure at these optimizer steps (``0``: at fit start, before any step).
        at_end: also measure at the end of training (if the last step was not measured).
        batch: the fixed batch, as the training loader yields it; ``None`` captures one.
        num_samples: size of the captured batch (ignored when ``batch`` is given).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``; ``None`` uses ``training_step``.
        measures: any of ``"top_eigenvalue"``, ``"trace"``, ``"filter_normalized"``.
        iterations: maximum power-iteration steps (Hessian-vector products).
        tol: relative tolerance at which the power iteration stops early.
        trace_samples: Rademacher probes of the trace estimate.
        directions: random directions, each probed at ``+radius`` and ``-radius``.
        radius: step along a direction, as a fraction of each filter's norm.
        seed: seeds the batch selection and all random vectors (the same at every probe).
        batch_norm: the statistics BatchNorm layers use during a probe: the probe batch's
            (``batch``, as in training; their running statistics are left as they were) or the
            running ones (``running``, as at evaluation).

    Attributes:
        history: one :class:`~lightning_tvlars.sharpness.SharpnessReport` per probe (rank 0).
        batch: the fixed batch, on the module's device, once captured.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        at_steps: Sequence[int] = (),
        at_end: bool = True,
        batch: Any | None = None,
        num_samples: int = 512,
        loss_fn: LossFn | None = None,
        measures: Sequence[str] = MEASURES,
        iterations: int = 20,
        tol: float = 1e-3,
        trace_samples: int = 10,
        directions: int = 5,
        radius: float = 0.05,
        seed: int = 0,
        batch_norm: BatchNormStatistics = "batch",
    ) -> None:
        super().__init__()
        if every_n_steps is not None:
            check_positive_int("every_n_steps", every_n_steps)
        if isinstance(at_steps, (str, bytes)) or not isinstance(at_steps, Sequence):
            raise TypeError(f"at_steps={at_steps!r} is invalid: expected a sequence of ints >= 0")
        for s in at_steps:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"at_steps={at_steps!r} is invalid: expected ints >= 0")
        if not isinstance(at_end, bool):
            raise TypeError(f"at_end={at_end!r} is invalid: expected a bool")
        if every_n_steps is None and not at_steps and not at_end:
            raise ValueError(
                "every_n_steps=None, at_steps=() and at_end=False leave nothing to measure: "
                "set at least one of them"
            )
        check_positive_int("num_samples", num_samples)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn={loss_fn!r} is invalid: expected a callable (module, batch) -> loss"
            )
        self.measures = _check_measures(measures)
        self.iterations = check_positive_int("iterations", iterations)
        self.tol = check_positive("tol", tol)
        self.trace_samples = check_positive_int("trace_samples", trace_samples)
        self.directions = check_positive_int("directions", directions)
        self.radius = check_positive("radius", radius)
        self.seed = _check_seed(seed)
        self.batch_norm: BatchNormStatistics = check_choice(  # type: ignore[assignment]
            "batch_norm", batch_norm, ("batch", "running")
        )
        self.every_n_steps = every_n_steps
        self.at_steps = frozenset(at_steps)
        self.at_end = at_end
        self.num_samples = num_samples
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else training_step_loss
        self._user_batch = batch
        self.batch: Any | None = None
        self.history: list[SharpnessReport] = []
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            at_steps=sorted(self.at_steps),
            measures=self.measures,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": [asdict(r) for r in self.history], "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [SharpnessReport(**r) for r in state_dict.get("history", [])]
        self._last_step = int(state_dict.get("last_step", -1))

    # ----------------------------------------------------------------------------------------
    # Hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":  # the probe only acts during training
            return
        strategy = trainer.strategy
        stage_zero = deepspeed_zero_stage(strategy)
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or stage_zero:
            name = type(strategy).__name__ + (f"(stage={stage_zero})" if stage_zero else "")
            raise ValueError(
                f"strategy={name} is not supported by SharpnessProbe: it measures the full "
                "module on one rank, but this strategy holds parameter shards. Use a single "
                "device or DDP."
            )
        if not pl_module.automatic_optimization and self.loss_fn is training_step_loss:
            raise ValueError(
                "loss_fn=None is invalid with manual optimization: training_step would step "
                "the optimizer; pass loss_fn=lambda module, batch: <the loss>"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.batch = self._prepare(trainer, pl_module)
        if 0 in self.at_steps and trainer.global_step == 0:
            self._measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object
    ) -> None:
        step = trainer.global_step
        due = step in self.at_steps or (
            self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
        )
        if due:
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end:
            self._measure(trainer, pl_module)

    # ----------------------------------------------------------------------------------------
    # The batch

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        with isolate_rng():
            torch.manual_seed(self.seed)
            random.seed(self.seed)
            np.random.seed(self.seed)
            batch = self._user_batch
            if batch is None:
                batch = self._capture(trainer.train_dataloader)
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            return trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    def _capture(self, loader: object) -> Any:
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"SharpnessProbe takes its batch from a single torch DataLoader, but the "
                f"training loader is {type(loader).__name__}; pass batch=..."
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or loader.batch_size is None:
            return self._first_batches(loader)
        size = len(dataset)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed)
        if size > self.num_samples:
            indices = torch.randperm(size, generator=generator)[: self.num_samples].tolist()
        else:
            indices = list(range(size))
        return loader.collate_fn([dataset[i] for i in indices])

    def _first_batches(self, loader: DataLoader) -> Any:
        batches, count = [], 0
        for batch in loader:
            batches.append(batch)
            n = _num_samples(batch)
            if n is None:
                raise ValueError(
                    "SharpnessProbe cannot tell the size of the training batches; pass batch=..."
                )
            count += n
            if count >= self.num_samples:
                break
        if not batches:
            raise ValueError("the training loader yielded no batch; pass batch=...")
        return _take(_concat(batches) if len(batches) > 1 else batches[0], self.num_samples)

    # ----------------------------------------------------------------------------------------
    # Measuring

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: several batches per step
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        batch = self.batch
        loss_fn = self.loss_fn

        def closure() -> Tensor:
            return loss_fn(pl_module, batch)

        with _quiet(pl_module):
            report = measure_sharpness(
                closure,
                pl_module,
                measures=self.measures,
                iterations=self.iterations,
                tol=self.tol,
                trace_samples=self.trace_samples,
                directions=self.directions,
                radius=self.radius,
                seed=self.seed,
                step=step,
                num_samples=_num_samples(batch),
                batch_norm=self.batch_norm,
            )
        self.history.append(report)
        metrics = report.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
