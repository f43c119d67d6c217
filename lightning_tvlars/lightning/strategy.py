"""Which Lightning strategies a layer-wise optimizer can run under, checked before training.

DeepSpeed ZeRO (stage >= 1) replaces the optimizer's parameter groups with flat fp32 partitions,
so per-layer norms do not exist any more; Lightning's DeepSpeed strategy also allows untested
optimizers by default, so the result would be silently wrong. It is refused here.
"""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_tvlars.lightning._compat import lightning_classes


def deepspeed_zero_stage(strategy: object) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy, ``None`` for any other strategy."""
    if not isinstance(strategy, lightning_classes("strategies.DeepSpeedStrategy")):
        return None
    config = getattr(strategy, "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_strategy(trainer: pl.Trainer) -> None:
    """Raise ``ValueError`` for strategies under which TVLARS would be silently wrong."""
    stage = deepspeed_zero_stage(trainer.strategy)
    if stage:
        raise ValueError(
            f"strategy=DeepSpeedStrategy(stage={stage}) is not supported: ZeRO hands the optimizer "
            "flat partitions of all parameters, so TVLARS cannot compute layer-wise norms. Use "
            "DeepSpeed with stage=0, FSDP (strategy='fsdp'), FSDP2 (ModelParallelStrategy) or DDP."
        )
