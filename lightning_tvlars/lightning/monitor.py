"""``TVLARSMonitor``: the phase, learning rate, effective batch and trust ratios of a Lightning run.

Modelled on Lightning's ``LearningRateMonitor``:

* **Callback metrics, every optimizer step.** The whole-model metrics (phase, lr, effective
  batch, skipped, trust-ratio min/median/max) go to ``trainer.callback_metrics`` after every
  optimizer step, as 0-d tensors that stay where they were computed: no host sync. So
  ``ModelCheckpoint(monitor="tvlars/trust_ratio_max")`` and ``EarlyStopping`` read them like a
  metric logged with ``self.log(..., on_step=True)``.
* **Loggers, at Lightning's logging steps.** On the steps where Lightning itself logs
  (``Trainer(log_every_n_steps)``, the logger connector's decision), at Lightning's own step
  (the same x value as ``train/loss``), every metric goes to every logger: one device-to-host
  copy per logging step. Per-layer metrics go to the loggers only, not to
  ``callback_metrics``. With ``prog_bar=True`` the whole-model metrics also go to the progress
  bar, refreshed at the logging steps.
* **A logger is required**, as for ``LearningRateMonitor``: without one the metrics would be
  computed and dropped. Without a logger, read :func:`~lightning_tvlars.tvlars_metrics`.

Values are global (the optimizer's norms are exact under sharding), so nothing is reduced with
``sync_dist``; under sharding every rank takes part in the one collective of the gradient
norms. Under gradient accumulation the metrics are read at the batch that stepped: the gradient
norms are those of the accumulated gradient the step used. The metric names are those of
:mod:`lightning_tvlars.metrics` (``lightning-tvlars plot`` reads them); a second TVLARS
optimizer logs under ``tvlars_1/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_tvlars._validation import check_positive, check_positive_int
from lightning_tvlars.lightning._compat import lightning_classes
from lightning_tvlars.lightning.run import effective_batch_size
from lightning_tvlars.metrics import (
    Reading,
    compile_name_filter,
    gradient_norms,
    metric_prefix,
    read_step,
    summary_tensors,
)
from lightning_tvlars.optim.base import LayerwiseOptimizer
from lightning_tvlars.recipe import check_strategy


class TVLARSMonitor(pl.Callback):
    """Send TVLARS internals to ``callback_metrics``, the loggers and the progress bar.

    Args:
        log_every_n_steps: ``None`` (default): log exactly when Lightning logs
            (``Trainer(log_every_n_steps=...)``). An int: log every this many optimizer
            steps instead, still at Lightning's step numbering (e.g. per-layer metrics less
            often than the loss).
        per_layer: log the four per-tensor metrics (else only the whole-model ones).
        name_filter: a regular expression (searched in the name), or a predicate on the
            parameter name; only matching tensors get per-layer metrics.
        histograms: also write histograms of trust ratios and LNR to TensorBoard loggers.
        warn_trust_ratio: warn (once) when an adapted trust ratio exceeds this value, the
            paper's early-phase explosion of ``||w|| / ||g||``; ``None`` disables it.
        prog_bar: also show the whole-model metrics in the progress bar.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        per_layer: bool = True,
        name_filter: str | Callable[[str], bool] | None = None,
        histograms: bool = False,
        warn_trust_ratio: float | None = 1.0,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None:
            check_positive_int("log_every_n_steps", log_every_n_steps)
        if warn_trust_ratio is not None:
            check_positive("warn_trust_ratio", warn_trust_ratio)
        self.name_filter = name_filter
        self._keep = compile_name_filter(name_filter)
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.histograms = histograms
        self.warn_trust_ratio = warn_trust_ratio
        self.prog_bar = prog_bar
        self._last_step: dict[int, int | Tensor] = {}
        #: Logging steps of the current fit at which the loggers received metrics.
        self.logged_steps = 0
        self._warned = False
        self._names: dict[int, str] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        if stage == "fit" and not trainer.loggers:
            raise ValueError(
                "TVLARSMonitor needs a logger, but the Trainer has none (logger=False): its "
                "metrics would be computed and dropped. Give the Trainer a logger (e.g. "
                "logger=CSVLogger('logs')) or remove the monitor (lightning_tvlars."
                "tvlars_metrics(optimizer) reads the same values without one)."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._optimizers(trainer):
            found = [type(opt).__name__ for opt in trainer.optimizers] or "none"
            raise ValueError(
                f"TVLARSMonitor needs a TVLARS or LAMB optimizer, but the trainer has {found}; "
                "remove the monitor or configure one (e.g. with TVLARSMixin or configure_tvlars)"
            )
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        self._last_step = {}
        self.logged_steps = 0

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[LayerwiseOptimizer]:
        return [opt for opt in trainer.optimizers if isinstance(opt, LayerwiseOptimizer)]

    def _should_log(self, trainer: pl.Trainer) -> bool:
        """Lightning's decision (``should_update_logs``), or every ``log_every_n_steps``."""
        if self.log_every_n_steps is None:
            return bool(trainer._logger_connector.should_update_logs)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1  # as Lightning counts
        return step % self.log_every_n_steps == 0 or bool(trainer.should_stop)

    @staticmethod
    def _effective_batch(trainer: pl.Trainer, optimizer: LayerwiseOptimizer) -> int | None:
        """From the optimizer's TVLARSScheduler plan, else from the trainer."""
        for config in trainer.lr_scheduler_configs:
            batch = getattr(getattr(config.scheduler, "plan", None), "effective_batch_size", None)
            if config.scheduler.optimizer is optimizer and batch is not None:
                return int(batch)
        try:
            return effective_batch_size(trainer)
        except ValueError:  # no readable batch size (custom loaders)
            return None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if pl_module.automatic_optimization and trainer.fit_loop._should_accumulate():
            return  # no optimizer step in this batch: the gradients are still accumulating
        log = self._should_log(trainer)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # Lightning's logging step
        for index, optimizer in enumerate(self._optimizers(trainer)):
            stats = optimizer.last_step_stats
            if stats is None:
                continue
            # t, or (capturable: t on the device, never read here) a tensor of the step itself
            marker = stats.step if isinstance(stats.step, int) else stats.skipped
            last = self._last_step.get(index)
            if last is marker or (isinstance(marker, int) and last == marker):
                continue  # this optimizer did not step since the last call
            self._last_step[index] = marker
            prefix = metric_prefix(index)
            batch = self._effective_batch(trainer, optimizer)
            trainer.callback_metrics.update(
                summary_tensors(optimizer, prefix=prefix, effective_batch_size=batch)
            )
            if log:
                self._log(trainer, optimizer, prefix, batch, step)
                if index == 0:
                    self.logged_steps += 1

    def _log(
        self,
        trainer: pl.Trainer,
        optimizer: LayerwiseOptimizer,
        prefix: str,
        batch: int | None,
        step: int,
    ) -> None:
        # Every rank takes part: under sharding the gradient norms need one collective.
        grad_norm = gradient_norms(optimizer)
        if not trainer.is_global_zero:
            return
        reading = read_step(
            optimizer,
            grad_norm,
            prefix=prefix,
            per_layer=self.per_layer,
            keep=self._keep,
            names=self._names,
            effective_batch_size=batch,
        )
        if reading is None:
            return
        if self.prog_bar:
            trainer.progress_bar_metrics.update(reading.scalars)
        self._warn_on_explosion(reading)
        tensorboard = lightning_classes("loggers.TensorBoardLogger")
        for logger in trainer.loggers:
            logger.log_metrics(reading.metrics, step=step)
            if self.histograms and isinstance(logger, tensorboard):
                experiment = logger.experiment  # type: ignore[attr-defined]
                experiment.add_histogram(f"{prefix}/trust_ratio", reading.ratios, step)
                experiment.add_histogram(f"{prefix}/lnr", reading.lnr, step)

    def _warn_on_explosion(self, reading: Reading) -> None:
        if self.warn_trust_ratio is None or self._warned:
            return
        trust = reading.trust_ratio
        worst = max(
            (i for i, adapted in enumerate(reading.adapted) if adapted),
            key=trust.__getitem__,
            default=None,
        )
        if worst is not None and trust[worst] > self.warn_trust_ratio:
            self._warned = True
            rank_zero_warn(
                f"TVLARS trust ratio of {reading.names[worst]!r} is {trust[worst]:.3g} at step "
                f"{reading.step} (> warn_trust_ratio={self.warn_trust_ratio}): ||w|| / ||g|| has "
                "exploded, the early-phase symptom described by the TVLARS paper. If training "
                "diverges, lower the learning rate, decay the phase earlier, or set norm_clip."
            )
