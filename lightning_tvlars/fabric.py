"""TVLARS under Lightning Fabric: the optimizer and its schedule in one call, no Trainer.

Fabric has no ``configure_optimizers`` and no callbacks that know the run, so the run is
described here, in the loop's own terms::

    fabric = Fabric(accelerator="cuda", devices=8, strategy="ddp", loggers=CSVLogger("logs"))
    fabric.launch()
    optimizer, scheduler = configure_tvlars_fabric(
        fabric, model, TVLARSConfig(lr=1.0), total_steps=10_000, batch_size=256, accumulation=2
    )
    model, optimizer = fabric.setup(model, optimizer)
    ...
    optimizer.step(); scheduler.step(); optimizer.zero_grad()   # once per optimizer step
    fabric.log_dict(tvlars_metrics(optimizer, scheduler=scheduler), step=step)   # every rank
    ...
    end_process_group_at_exit()   # at the end of a successful run, on every rank

The learning rate is scaled with the effective batch ``batch_size x data-parallel replicas x
accumulation`` (replicas: the strategy's ``distributed_sampler_kwargs["num_replicas"]``, i.e.
``fabric.world_size`` under DDP/FSDP), and a fitted phase is fitted to ``total_steps``
optimizer steps, exactly as :func:`~lightning_tvlars.configure_tvlars` does under a Trainer.
:func:`~lightning_tvlars.tvlars_metrics` gives the metrics of
:class:`~lightning_tvlars.TVLARSMonitor`, under the same names.
:func:`~lightning_tvlars.distributed.end_process_group_at_exit` (from
``lightning_tvlars.distributed``) destroys the process group when the process exits, which
Fabric does for NCCL only: a gloo group left to the interpreter's shutdown can abort it.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric import Fabric
from torch import nn

from lightning_tvlars._validation import check_positive_int
from lightning_tvlars.lightning.config import TVLARSConfig
from lightning_tvlars.lightning.configure import (
    Parameters,
    build_groups,
    build_optimizer,
    build_scheduler,
    describe_plan,
)
from lightning_tvlars.lightning.run import RunFacts
from lightning_tvlars.optim import TVLARS
from lightning_tvlars.schedule import TVLARSScheduler


def data_parallel_size(fabric: Fabric) -> int:
    """How many replicas see different data (the DP degree; 1 on one device)."""
    kwargs = getattr(fabric.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", 1))


def _check_strategy(fabric: Fabric) -> None:
    """DeepSpeed ZeRO hands the optimizer flat partitions: no layer-wise norms exist."""
    strategy = fabric.strategy
    if type(strategy).__name__ == "DeepSpeedStrategy":
        stage = int(
            (getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage", 0)
        )
        if stage:
            raise ValueError(
                f"strategy=DeepSpeedStrategy(stage={stage}) is not supported: ZeRO hands the "
                "optimizer flat partitions of all parameters, so TVLARS cannot compute layer-wise "
                "norms. Use DeepSpeed with stage=0, FSDP or DDP."
            )


def configure_tvlars_fabric(
    fabric: Fabric,
    model: nn.Module,
    config: TVLARSConfig | dict[str, Any] | None = None,
    *,
    total_steps: int | None,
    batch_size: int,
    accumulation: int = 1,
    parameters: Parameters = None,
    steps_per_epoch: int | None = None,
) -> tuple[TVLARS, TVLARSScheduler]:
    """Build TVLARS and its :class:`~lightning_tvlars.TVLARSScheduler` for a Fabric loop.

    Call it after ``fabric.launch()`` (inside the launched function for spawn strategies), with
    the model before ``fabric.setup`` (DDP) or after ``fabric.setup_module`` (FSDP); then
    ``fabric.setup_optimizers(optimizer)``, and ``scheduler.step()`` after every
    ``optimizer.step()``.

    Args:
        fabric: the Fabric object (its strategy gives the data-parallel replicas).
        model: the model (or Fabric's wrapper of it); parameter names are its own.
        config: the options (:class:`~lightning_tvlars.TVLARSConfig`, a mapping, or defaults).
        total_steps: optimizer steps of the run (``None``: unknown; then the phase must be
            ``explicit`` or ``off`` and the LR schedule ``constant``).
        batch_size: the per-device batch size of one forward/backward.
        accumulation: batches accumulated per optimizer step.
        parameters: ``None`` (every trainable parameter of ``model``), a submodule, or
            parameter groups of ``model``'s parameters, as in ``configure_tvlars``.
        steps_per_epoch: optimizer steps per epoch, needed only for a phase delay given in
            epochs (``phase.delay_unit='epochs'``).

    Returns:
        ``(optimizer, scheduler)``.

    Raises:
        ValueError: a fitted phase or a cosine without ``total_steps``, DeepSpeed ZeRO, bad
            options.
    """
    config = TVLARSConfig.from_any(config)
    check_positive_int("batch_size", batch_size)
    check_positive_int("accumulation", accumulation)
    if total_steps is not None:
        check_positive_int("total_steps", total_steps)
    if steps_per_epoch is not None:
        check_positive_int("steps_per_epoch", steps_per_epoch)
    elif config.phase.mode == "explicit" and config.phase.delay_unit == "epochs":
        raise ValueError(
            "phase.delay_unit='epochs' needs steps_per_epoch=... (optimizer steps per epoch) "
            "under Fabric: pass it, or give phase.delay in steps"
        )
    _check_strategy(fabric)
    facts = RunFacts(
        total_steps=total_steps,
        steps_per_epoch=(steps_per_epoch,) if steps_per_epoch else (),
        per_device_batch_size=batch_size,
        replicas=data_parallel_size(fabric),
        accumulation=accumulation,
    )
    original = getattr(model, "module", model) if hasattr(model, "_forward_module") else model
    optimizer = build_optimizer(build_groups(original, config, parameters), config)
    wrapped = getattr(model, "_forward_module", None)
    if type(fabric.strategy).__name__ == "FSDPStrategy" and wrapped is not None:
        optimizer.attach_fsdp(wrapped)  # FSDP1 (use_orig_params=True): exact norms
    scheduler = build_scheduler(optimizer, config, facts)
    fabric.print(describe_plan(scheduler, config, facts))
    return optimizer, scheduler
