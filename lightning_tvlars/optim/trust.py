r"""The steps every member of the family shares: layer norms, the trust ratio, the skip.

An optimizer of the family forms an update direction :math:`u` per tensor (LARS:
:math:`g + \beta w`; LAMB: the Adam direction :math:`+ \beta w`), then

.. math::

    r = c\, \frac{\min(\|w\|, C)}{\min(\|u\|, C)} \quad (r = 1 \text{ if } \|w\| = 0
    \text{ or } \|u\| = 0), \qquad s = \phi(t)\, \min(r, r_{\max})

and scales the adapted tensors' updates by :math:`s` (:math:`c` the trust coefficient, :math:`C`
an optional norm clip, :math:`r_{\max}` an optional bound on the ratio). Every norm is needed
before anything is written: the trust ratio needs whole-tensor norms (summed over shards in one
collective, :mod:`~lightning_tvlars.optim.norms`), and a non-finite update anywhere skips the
whole step on the device (:func:`skip_decision`), with no host read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from lightning_tvlars.optim.workspace import Bucket

#: ``(params, local norms) -> full norms``: sums the squares of the norms of local pieces over
#: the ranks holding the other pieces (``local`` stacks one or more lists of ``len(params)``
#: norms); without sharding, the identity.
Reduce = Callable[[Sequence[Tensor], Tensor], Tensor]


def no_reduction(params: Sequence[Tensor], local: Tensor) -> Tensor:
    """The :data:`Reduce` of unsharded tensors: local norms are full norms."""
    return local


def accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float32, or float64 when any tensor is float64: norms never accumulate in 16 bits."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an update is computed in: float32 for 16-bit tensors, as torch's fused kernels
    do (the weights and the state are rounded to their own dtype once per step)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tensor_norms(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``||x||_2`` of every tensor, one vector on ``device`` (one multi-tensor pass per device)."""
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    if len({t.device for t in tensors}) == 1 and not torch.compiler.is_compiling():
        return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=dtype)).to(device)
    return torch.stack([torch.linalg.vector_norm(x, dtype=dtype).to(device) for x in tensors])


def pair_norms(
    weights: Sequence[Tensor], updates: Sequence[Tensor], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(||w||, ||u||)`` of every tensor, asked for in pairs ``w_i, u_i``: under
    ``torch.compile`` Inductor then reads each weight once for both norms (one pass over ``w_i``
    and ``g_i``; two lists of norms read every weight twice, 1.7x the time on ResNet-50)."""
    pairs = [x for pair in zip(weights, updates, strict=True) for x in pair]
    norms = tensor_norms(pairs, dtype, device).view(-1, 2)
    return norms[:, 0], norms[:, 1]


def trust_ratio(
    weight_norm: Tensor,
    update_norm: Tensor,
    trust_coefficient: float = 1.0,
    norm_clip: float | None = None,
    max_ratio: float | None = None,
) -> Tensor:
    """``c * ||w|| / ||u||`` element-wise, 1 where either norm is 0.

    With ``norm_clip`` both norms are clamped to at most ``norm_clip`` first (the TVLARS
    authors' code uses 10); with ``max_ratio`` the ratio is clamped to at most that (LAMBC's
    trust clipping: 1). No host synchronisation: zero norms are handled with ``torch.where``.
    """
    w, u = weight_norm, update_norm
    if norm_clip is not None:
        w, u = w.clamp(max=norm_clip), u.clamp(max=norm_clip)
    ratio = torch.where((weight_norm > 0) & (update_norm > 0), trust_coefficient * w / u, 1.0)
    return ratio if max_ratio is None else ratio.clamp(max=max_ratio)


def skip_decision(update_norm: Tensor, found_inf: Tensor | None) -> Tensor:
    """A bool scalar on the device: True when any update norm is not finite, or a GradScaler
    found ``inf``/``nan`` in the scaled gradients. The whole step is then a no-op."""
    skipped = update_norm.isfinite().all().logical_not()
    if found_inf is not None:
        skipped = skipped | (found_inf.to(skipped.device) > 0)
    return skipped


@dataclass(frozen=True)
class StepStats:
    """What the last step computed, one entry per updated tensor, still on the device.

    Reading them (``.tolist()``) is one device to host copy: the monitor's business, at its own
    log interval (:func:`~lightning_tvlars.tvlars_metrics`).

    Attributes:
        step: t of that step (0 for the first); a 0-d tensor on the device with
            ``capturable=True``.
        phase: phi(t) as applied to adapted tensors (1.0 without a phase); a 0-d tensor when
            the step ran under ``torch.compile`` or with ``capturable=True``.
        params: the updated parameters, in the order of the other entries (empty for a step
            without gradients).
        names: their names where the group has ``param_names``, else ``None``.
        adapted: whether each tensor got the trust ratio and phase.
        lr: the learning rate of each tensor's group (a 0-d tensor, copied at the step, where
            the group's rate is a tensor).
        weight_norm: ``||w||`` before the update (float32; float64 for float64 tensors).
        update_norm: ``||u||`` of the update direction the trust ratio divides by (TVLARS:
            ``g + weight_decay * w``; LAMB: the Adam direction with weight decay).
        trust_ratio: ``r`` (without the phase), 1.0 for tensors that are not adapted.
        skipped: a bool scalar, True when the step changed nothing: a non-finite update, a
            ``GradScaler`` that found ``inf``/``nan``, or no gradient at all.
    """

    step: int | Tensor
    phase: float | Tensor
    params: tuple[Tensor, ...]
    names: tuple[str | None, ...]
    adapted: tuple[bool, ...]
    lr: tuple[float | Tensor, ...]
    weight_norm: Tensor
    update_norm: Tensor
    trust_ratio: Tensor
    skipped: Tensor

    @classmethod
    def empty(cls, step: int | Tensor, phase: float | Tensor) -> StepStats:
        """A step in which no parameter had a gradient: nothing changed."""
        nothing = torch.zeros(0)
        return cls(step, phase, (), (), (), (), nothing, nothing, nothing, torch.tensor(True))


class Options(Protocol):
    """What the shared step reads of a group: its tensors (as held) and two options."""

    @property
    def params(self) -> list[Tensor]: ...
    @property
    def lr(self) -> float | Tensor: ...
    @property
    def adapt(self) -> bool: ...


G = TypeVar("G", bound=Options)


class Formed(NamedTuple):
    """What the first half of an update gives for a bucket: the local norms of its weights and
    update directions, and whatever its second half needs (``carry``)."""

    weight_norm: Tensor
    update_norm: Tensor
    carry: Any


class StepResult(NamedTuple):
    """The raw results of a step; :meth:`stats` turns them into :class:`StepStats` on demand."""

    params: tuple[Tensor, ...]
    adapted: tuple[bool, ...]
    lr: tuple[float | Tensor, ...]
    weight_norm: Tensor
    update_norm: Tensor
    ratios: tuple[tuple[int, Tensor | None], ...]  # per bucket: its size and trust ratios
    skipped: Tensor

    def stats(self, step: int | Tensor, phase: float | Tensor, names: dict[int, str]) -> StepStats:
        if not self.params:
            return StepStats.empty(step, phase)
        ratios = [r if r is not None else self.weight_norm.new_ones(n) for n, r in self.ratios]
        return StepStats(
            step=step,
            phase=phase,
            params=self.params,
            names=tuple(names.get(id(p)) for p in self.params),
            adapted=self.adapted,
            lr=self.lr,
            weight_norm=self.weight_norm,
            update_norm=self.update_norm,
            trust_ratio=torch.cat(ratios),
            skipped=self.skipped,
        )


def layerwise_step(
    work: Sequence[tuple[G, Bucket]],
    *,
    directions: Callable[[G, Bucket], Formed],
    ratio: Callable[[G, Tensor, Tensor], Tensor],
    apply: Callable[[G, Bucket, Any, Tensor | None, Tensor], None],
    phase: float | Tensor,
    reduce: Reduce,
    found_inf: Tensor | None,
) -> StepResult:
    """The steps every member of the family takes, given its two halves per bucket:

    1. ``directions``: form each tensor's update direction ``u``, return the local norms;
    2. one reduction of all norms (:data:`Reduce`), the skip decision, and per adapted bucket
       the scale ``phi * ratio(||w||, ||u||)``;
    3. ``apply``: the update with that scale (None: not adapted), a no-op on the device when
       ``skipped``.
    """
    formed = [directions(group, bucket) for group, bucket in work]
    params = tuple(group.params[i] for group, bucket in work for i in bucket.members)
    device = formed[0].weight_norm.device
    local = torch.cat(
        [f.weight_norm.to(device) for f in formed] + [f.update_norm.to(device) for f in formed]
    )
    weight_norm, update_norm = reduce(params, local).split(len(params))
    skipped = skip_decision(update_norm, found_inf)
    sizes = [len(bucket.members) for _, bucket in work]
    rates = [snapshot(group.lr) for group, _ in work]  # per bucket: a copy per tensor rate
    ratios = []
    for (group, bucket), f, w, u in zip(
        work, formed, weight_norm.split(sizes), update_norm.split(sizes), strict=True
    ):
        r = ratio(group, w, u) if group.adapt else None
        scale = r if r is None or (isinstance(phase, float) and phase == 1.0) else r * phase
        apply(group, bucket, f.carry, scale, skipped)
        ratios.append((len(bucket.members), r))
    return StepResult(
        params=params,
        adapted=tuple(group.adapt for group, bucket in work for _ in bucket.members),
        lr=tuple(lr for (_, bucket), lr in zip(work, rates, strict=True) for _ in bucket.members),
        weight_norm=weight_norm,
        update_norm=update_norm,
        ratios=tuple(ratios),
        skipped=skipped,
    )


def snapshot(lr: float | Tensor) -> float | Tensor:
    """A learning rate as a step applied it: a tensor rate is copied on its device (a scheduler
    writes the next one in place before anybody reads the statistics)."""
    return lr.detach().clone() if isinstance(lr, Tensor) else lr


def kernel_lr(lr: float | Tensor, device: torch.device) -> float | Tensor:
    """A learning rate as torch's fused kernels take it: a float, or a float32 tensor on their
    device (their CPU versions read any 0-d tensor; a no-op when it is already there)."""
    if isinstance(lr, Tensor) and device.type != "cpu":
        return lr.to(device, torch.float32)
    return lr


def empty_result() -> StepResult:
    """The result of a step in which no parameter had a gradient."""
    nothing = torch.zeros(0)
    return StepResult((), (), (), nothing, nothing, (), torch.tensor(True))
