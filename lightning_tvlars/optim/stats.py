"""What a TVLARS step computed, kept on the device until someone reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TVLARSStepStats:
    """What the last :meth:`~lightning_tvlars.TVLARS.step` computed, one entry per tensor.

    The tensors stay on the parameters' device; reading them (``.tolist()``) is one device to
    host copy, which is the monitor's business at its own log interval.

    Attributes:
        step: t of that step (0 for the first).
        phase: phi(t) as applied to adapted tensors (1.0 without a phase); a 0-d tensor when
            the step ran under ``torch.compile``.
        params: the updated parameters, in order (empty for a step without gradients).
        names: their names where the group has ``param_names``, else ``None``.
        adapted: whether each tensor got the trust ratio and phase.
        lr: the learning rate of each tensor's group.
        weight_norm: ``||w||`` before the update (float32; float64 for float64 tensors).
        update_norm: ``||g + weight_decay * w||`` of the unscaled gradient.
        trust_ratio: ``r`` (without the phase), 1.0 for tensors that are not adapted.
        skipped: a bool scalar, True when the step changed nothing: a non-finite update, a
            ``GradScaler`` that found ``inf``/``nan``, or no gradient at all.
    """

    step: int
    phase: float | Tensor
    params: tuple[Tensor, ...]
    names: tuple[str | None, ...]
    adapted: tuple[bool, ...]
    lr: tuple[float, ...]
    weight_norm: Tensor
    update_norm: Tensor
    trust_ratio: Tensor
    skipped: Tensor


@dataclass
class GroupRecord:
    """One group's share of a step: its tensors, options and trust ratios (None: not adapted)."""

    params: list[Tensor]
    names: list[str | None]
    adapt: bool
    lr: float
    ratio: Tensor | None


@dataclass
class StepRecord:
    """The raw results of a step, turned into :class:`TVLARSStepStats` only when read."""

    step: int
    phase: float | Tensor
    groups: list[GroupRecord]
    weight_norm: Tensor
    update_norm: Tensor
    skipped: Tensor

    @classmethod
    def empty(cls, step: int, phase: float | Tensor) -> StepRecord:
        """A step in which no parameter had a gradient: nothing changed."""
        nothing = torch.zeros(0)
        return cls(step, phase, [], nothing, nothing, torch.tensor(True))

    def stats(self) -> TVLARSStepStats:
        ratios = [
            g.ratio if g.ratio is not None else self.weight_norm.new_ones(len(g.params))
            for g in self.groups
        ]
        return TVLARSStepStats(
            step=self.step,
            phase=self.phase,
            params=tuple(p for g in self.groups for p in g.params),
            names=tuple(n for g in self.groups for n in g.names),
            adapted=tuple(g.adapt for g in self.groups for _ in g.params),
            lr=tuple(g.lr for g in self.groups for _ in g.params),
            weight_norm=self.weight_norm,
            update_norm=self.update_norm,
            trust_ratio=torch.cat(ratios) if ratios else self.weight_norm.new_zeros(0),
            skipped=self.skipped,
        )
