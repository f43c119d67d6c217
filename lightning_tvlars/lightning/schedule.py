"""Learning-rate schedules as picklable multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

TVLARS runs at a constant rate by default; the baselines of the paper (LARS and LAMB) use a
linear warm-up from 0 followed by a cosine decay to ``final_ratio`` x peak, stepped every
optimizer step. The multiplier also carries the batch-size ``scale``, so that a change of the
effective batch (gradient-accumulation schedules) only updates one number. ``LambdaLR`` saves
the attributes of callable objects in its ``state_dict``, so all of this resumes from a
checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lightning_tvlars._validation import check_choice, check_non_negative, check_positive

ScheduleKind = Literal["constant", "cosine"]


@dataclass
class LRMultiplier:
    """``lr(step) = base_lr * scale * warmup(step) * decay(step)``.

    Args:
        scale: the batch-size scaling factor (see
            :func:`~lightning_tvlars.lightning.scaling.scaled_lr`).
        warmup_steps: linear warm-up from ``1 / (warmup_steps + 1)`` to 1 (0: none).
        total_steps: length of the run, for the cosine decay.
        kind: ``constant`` or ``cosine`` after the warm-up.
        final_ratio: the cosine ends at ``final_ratio`` x peak.

    >>> m = LRMultiplier(scale=2.0, warmup_steps=4, total_steps=14, kind="cosine", final_ratio=0.0)
    >>> [round(m(s), 3) for s in (0, 3, 4, 9, 14)]
    [0.4, 1.6, 2.0, 1.0, 0.0]
    """

    scale: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 1
    kind: ScheduleKind = "constant"
    final_ratio: float = 1e-3

    def __post_init__(self) -> None:
        check_positive("scale", self.scale)
        check_non_negative("warmup_steps", self.warmup_steps)
        check_positive("total_steps", self.total_steps)
        check_choice("schedule", self.kind, ("constant", "cosine"))
        check_non_negative("final_ratio", self.final_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.scale * (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return self.scale
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.scale * (self.final_ratio + (1.0 - self.final_ratio) * cosine)
