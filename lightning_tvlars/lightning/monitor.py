"""``TVLARSMonitor``: log the phase, learning rate, effective batch and per-layer trust ratios.

The optimizer keeps the last step's statistics on the device; the monitor reads them only on
logging steps, packs everything into one tensor and copies it to the host once (one sync per
log interval, none in between). Gradient norms are computed on logging steps only, from the
gradients Lightning leaves in place until the next ``zero_grad``. Metrics go to every logger of
the trainer on global rank zero, never through ``sync_dist``.

Metrics (``<name>`` is the parameter's qualified name)::

    tvlars/phase                  phi(t) of the last step
    tvlars/lr                     learning rate of the adapted group
    tvlars/effective_batch_size   per device x data-parallel replicas x accumulation
    tvlars/skipped                1 if the last step was skipped for a non-finite update
    tvlars/trust_ratio_{min,median,max}   over adapted tensors
    tvlars/trust_ratio/<name>     r = eta ||w|| / ||g + beta w||          (per_layer=True)
    tvlars/lnr/<name>             layer-wise normalized rate ||w|| / ||g||
    tvlars/weight_norm/<name>     ||w||
    tvlars/grad_norm/<name>       ||g||
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_tvlars._validation import check_positive, check_positive_int
from lightning_tvlars.lightning.scaling import effective_batch_size
from lightning_tvlars.lightning.strategy import check_strategy
from lightning_tvlars.optim import TVLARS, TVLARSStepStats


class TVLARSMonitor(pl.Callback):
    """Log TVLARS internals to every Lightning logger.

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps=...)``.
        per_layer: log the four per-tensor metrics (else only phase, lr, batch and summaries).
        name_filter: a regular expression, or a predicate on the parameter name; only matching
            tensors get per-layer metrics.
        histograms: also write histograms of trust ratios and LNR to TensorBoard loggers.
        warn_trust_ratio: warn (once) when an adapted trust ratio exceeds this value, the
            paper's early-phase explosion of ``||w|| / ||g||``; ``None`` disables it.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        per_layer: bool = True,
        name_filter: str | Callable[[str], bool] | None = None,
        histograms: bool = False,
        warn_trust_ratio: float | None = 1.0,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None:
            check_positive_int("log_every_n_steps", log_every_n_steps)
        if warn_trust_ratio is not None:
            check_positive("warn_trust_ratio", warn_trust_ratio)
        if (
            name_filter is not None
            and not isinstance(name_filter, str)
            and not callable(name_filter)
        ):
            raise TypeError(
                f"name_filter={name_filter!r} is invalid: expected a regex string, a callable "
                "or None"
            )
        self.name_filter: re.Pattern[str] | Callable[[str], bool] | None = (
            re.compile(name_filter) if isinstance(name_filter, str) else name_filter
        )
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.histograms = histograms
        self.warn_trust_ratio = warn_trust_ratio
        self._last_logged_step = -1
        self._warned = False
        self._names: dict[int, str] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._optimizers(trainer):
            found = [type(opt).__name__ for opt in trainer.optimizers] or "none"
            raise ValueError(
                f"TVLARSMonitor needs a TVLARS optimizer, but the trainer has {found}; remove the "
                "monitor or configure TVLARS (e.g. with TVLARSMixin or configure_tvlars)"
            )
        self._names = {id(p): n for n, p in pl_module.named_parameters()}

    def _keep(self, name: str) -> bool:
        if self.name_filter is None:
            return True
        if isinstance(self.name_filter, re.Pattern):
            return self.name_filter.search(name) is not None
        return bool(self.name_filter(name))

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[TVLARS]:
        return [opt for opt in trainer.optimizers if isinstance(opt, TVLARS)]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object
    ) -> None:
        interval = self.log_every_n_steps
        if interval is None:
            interval = int(getattr(trainer, "log_every_n_steps", 50))
        optimizers = self._optimizers(trainer)
        for index, optimizer in enumerate(optimizers):
            stats = optimizer.last_step_stats
            if stats is None or stats.step == self._last_logged_step or stats.step % interval:
                continue
            if index == len(optimizers) - 1:
                self._last_logged_step = stats.step
            prefix = "tvlars" if index == 0 else f"tvlars_{index}"
            self._log(trainer, pl_module, optimizer, stats, prefix)

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: TVLARS,
        stats: TVLARSStepStats,
        prefix: str,
    ) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in stats.params]
        # Every rank takes part: under sharding the gradient norms need one collective.
        grad_norm = optimizer.full_norms(list(stats.params), grads).to(stats.weight_norm.dtype)
        if not trainer.is_global_zero:
            return
        adapted = torch.tensor(stats.adapted, device=stats.weight_norm.device)
        ratios = stats.trust_ratio[adapted] if any(stats.adapted) else stats.trust_ratio
        n = len(stats.params)
        packed = torch.cat(
            [
                stats.weight_norm,
                grad_norm,
                stats.trust_ratio,
                ratios.min().view(1),
                ratios.median().view(1),
                ratios.max().view(1),
                stats.skipped.to(stats.weight_norm.dtype).view(1),
            ]
        ).tolist()  # the one device-to-host copy of this log step
        weight_norm, grad_norm_l, trust = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
        r_min, r_med, r_max, skipped = packed[3 * n :]
        lr = next((lr for lr, a in zip(stats.lr, stats.adapted, strict=True) if a), stats.lr[0])
        metrics = {
            f"{prefix}/phase": float(stats.phase),
            f"{prefix}/lr": lr,
            f"{prefix}/skipped": skipped,
            f"{prefix}/trust_ratio_min": r_min,
            f"{prefix}/trust_ratio_median": r_med,
            f"{prefix}/trust_ratio_max": r_max,
        }
        plan = getattr(pl_module, "tvlars_plan", None)
        with contextlib.suppress(ValueError):  # no readable batch size (custom loaders)
            metrics[f"{prefix}/effective_batch_size"] = (
                plan.effective_batch_size if plan is not None else effective_batch_size(trainer)
            )
        names = [
            name or self._names.get(id(p), f"param_{i}")
            for i, (name, p) in enumerate(zip(stats.names, stats.params, strict=True))
        ]
        if self.per_layer:
            for i, name in enumerate(names):
                if not self._keep(name):
                    continue
                gn = grad_norm_l[i]
                metrics[f"{prefix}/weight_norm/{name}"] = weight_norm[i]
                metrics[f"{prefix}/grad_norm/{name}"] = gn
                metrics[f"{prefix}/lnr/{name}"] = weight_norm[i] / gn if gn > 0 else float("inf")
                if stats.adapted[i]:
                    metrics[f"{prefix}/trust_ratio/{name}"] = trust[i]
        self._warn_on_explosion(stats, names, trust)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if self.histograms and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(
                    f"{prefix}/trust_ratio", ratios, trainer.global_step
                )
                lnr = stats.weight_norm / grad_norm.clamp_min(torch.finfo(grad_norm.dtype).tiny)
                logger.experiment.add_histogram(f"{prefix}/lnr", lnr, trainer.global_step)

    def _warn_on_explosion(
        self, stats: TVLARSStepStats, names: list[str], trust: list[float]
    ) -> None:
        if self.warn_trust_ratio is None or self._warned:
            return
        worst = max(
            (i for i in range(len(names)) if stats.adapted[i]), key=trust.__getitem__, default=None
        )
        if worst is not None and trust[worst] > self.warn_trust_ratio:
            self._warned = True
            rank_zero_warn(
                f"TVLARS trust ratio of {names[worst]!r} is {trust[worst]:.3g} at step "
                f"{stats.step} "
                f"(> warn_trust_ratio={self.warn_trust_ratio}): ||w|| / ||g|| has exploded, the "
                "early-phase symptom described by the TVLARS paper. If training diverges, lower "
                "the learning rate, decay the phase earlier, or set norm_clip."
            )
