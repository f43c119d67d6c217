"""The recipe under Lightning Fabric: the optimizer and its schedule in one call, no Trainer.

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
optimizer steps, exactly as :func:`~lightning_tvlars.configure_tvlars` does under a Trainer:
both describe the run and call :func:`~lightning_tvlars.recipe.build`.
:func:`~lightning_tvlars.tvlars_metrics` gives the metrics of
:class:`~lightning_tvlars.TVLARSMonitor`, under the same names;
:func:`~lightning_tvlars.distributed.end_process_group_at_exit` destroys the process group when
the process exits, which Fabric does for NCCL only (a gloo group left to the interpreter's
shutdown can abort it).

This module imports neither Lightning package: ``fabric`` is any Fabric (``lightning.fabric``
or the standalone ``lightning_fabric``), read through ``fabric.strategy`` and
``fabric.print`` only, so a Fabric program never loads the Trainer stack because of it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_tvlars._validation import check_positive_int
from lightning_tvlars.optim.base import LayerwiseOptimizer
from lightning_tvlars.recipe import (
    Parameters,
    RunFacts,
    TVLARSConfig,
    build,
    check_strategy,
    data_parallel_size,
    describe_plan,
)
from lightning_tvlars.schedule import TVLARSScheduler


def configure_tvlars_fabric(
    fabric: Any,
    model: nn.Module,
    config: TVLARSConfig | dict[str, Any] | None = None,
    *,
    total_steps: int | None,
    batch_size: int,
    accumulation: int = 1,
    parameters: Parameters | None = None,
    steps_per_epoch: int | None = None,
) -> tuple[LayerwiseOptimizer, TVLARSScheduler]:
    """Build the optimizer ``config`` asks for (TVLARS or LAMB) and its schedule for a Fabric
    loop.

    Call it after ``fabric.launch()`` (inside the launched function for spawn strategies), with
    the model before ``fabric.setup`` (DDP) or after ``fabric.setup_module`` (FSDP); then
    ``fabric.setup_optimizers(optimizer)``, and ``scheduler.step()`` after every
    ``optimizer.step()`` (the rate of each step is right without it, too).

    Args:
        fabric: the Fabric object (its strategy gives the data-parallel replicas).
        model: the model (or Fabric's wrapper of it); parameter names are its own.
        config: the options (:class:`~lightning_tvlars.TVLARSConfig`, a mapping, or defaults).
        total_steps: optimizer steps of the run (``None``: unknown; then the phase must be
            ``explicit`` or ``off``, without a warm-up or annealing); ``config.total_steps``
            wins when set.
        batch_size: the per-device batch size of one forward/backward.
        accumulation: batches accumulated per optimizer step.
        parameters: ``None`` (every trainable parameter of ``model``), a submodule, or
            parameter groups of ``model``'s parameters, as in ``configure_tvlars``.
        steps_per_epoch: optimizer steps per epoch, needed only for a phase delay given in
            epochs (``phase.delay_unit='epochs'``).

    Returns:
        ``(optimizer, scheduler)``.

    Raises:
        ValueError: a schedule that needs the run length without one, DeepSpeed ZeRO, bad
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
    check_strategy(fabric.strategy)
    facts = RunFacts(
        total_steps=total_steps,
        per_device_batch_size=batch_size,
        replicas=data_parallel_size(fabric.strategy),
        accumulation=accumulation,
        steps_per_epoch=(steps_per_epoch,) if steps_per_epoch else (),
    )
    wrapped = getattr(model, "_forward_module", None)  # Fabric's _FabricModule
    original = getattr(model, "module", model) if wrapped is not None else model
    optimizer, scheduler = build(original, config, facts, parameters=parameters)
    if type(fabric.strategy).__name__ == "FSDPStrategy" and wrapped is not None:
        optimizer.attach_fsdp(wrapped)  # FSDP1 (use_orig_params=True): exact norms
    fabric.print(describe_plan(scheduler, facts))
    return optimizer, scheduler
