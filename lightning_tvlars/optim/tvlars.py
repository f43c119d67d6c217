r"""TVLARS: LARS whose trust ratio is multiplied by a decaying phase (Do et al., arXiv 2309.14053).

For optimizer step :math:`t` (0 for the first step) and every tensor :math:`w` with gradient
:math:`g` in a group with learning rate :math:`\eta_{lr}`, momentum :math:`m`, weight decay
:math:`\beta` and trust coefficient :math:`\eta`:

.. math::

    u &= g + \beta w \\
    r &= \eta \, \|w\| / \|u\| \quad (r = 1 \text{ if } \|w\| = 0 \text{ or } \|u\| = 0) \\
    b &\leftarrow m\, b + \phi(t)\, r\, u \\
    w &\leftarrow w - \eta_{lr}\, b

Tensors of groups with ``adapt=False`` (biases, normalization parameters) take
:math:`b \leftarrow m b + u`: no trust ratio and no phase. With ``phase=None``, :math:`\phi = 1`
and this is LARS in the form of Barlow Twins / SimCLR. ``nesterov=True`` steps by
:math:`\phi r u + m b` instead of :math:`b` (timm's ``nlars``); ``maximize=True`` ascends
(:math:`u = -g + \beta w`).

:class:`TVLARS` holds the options and the state; :func:`tvlars` is the update, in two
implementations that compute the same thing: ``_single_tensor_*`` (elementwise operations per
tensor: any layout and device, float32 arithmetic for 16-bit tensors, and what ``torch.compile``
fuses) and ``_multi_tensor_*`` (a fixed number of multi-tensor calls per batch, see
:mod:`~lightning_tvlars.optim.workspace`, ending in torch's fused momentum-SGD kernel).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_tvlars._validation import check_non_negative, check_positive, check_unit_interval
from lightning_tvlars.optim.base import LayerwiseOptimizer, Phase
from lightning_tvlars.optim.groups import param_groups, split_by_ndim
from lightning_tvlars.optim.norms import local_tensor
from lightning_tvlars.optim.trust import (
    Formed,
    Reduce,
    StepResult,
    accumulation_dtype,
    compute_dtype,
    empty_result,
    kernel_lr,
    layerwise_step,
    no_reduction,
    pair_norms,
    trust_ratio,
)
from lightning_tvlars.optim.workspace import Batch, Bucket, Layout, LayoutCache
from lightning_tvlars.phase import SigmoidPhase

_REFERENCE_WEIGHT_DECAY = 5e-4
_REFERENCE_NORM_CLIP = 10.0


class LarsGroup(NamedTuple):
    """One parameter group's tensors and options, as :func:`tvlars` takes them."""

    params: list[Tensor]  # as held (DTensor, FSDP1 views): the norms' reduction and statistics
    weights: list[Tensor]  # their local tensors, read and written
    grads: list[Tensor]  # local, laid out like the weights
    momentum_buffers: list[Tensor]  # local; empty when momentum == 0
    lr: float | Tensor  # a tensor: read by the kernels on the device
    momentum: float
    weight_decay: float
    trust_coefficient: float
    norm_clip: float | None
    adapt: bool
    nesterov: bool = False
    maximize: bool = False
    foreach: bool | None = None


class TVLARS(LayerwiseOptimizer):
    """Time-Varying LARS: LARS whose trust ratio is multiplied by a decaying phase phi(t).

    Args:
        params: tensors, or parameter groups (dicts). Group keys: the options below (but
            ``phase``) and ``adapt`` (default True: trust ratio and phase; False: plain momentum
            SGD); any other key (``param_names``, ``name``, timm's ``lr_scale``) is carried
            along. :func:`~lightning_tvlars.param_groups` builds the usual split (biases and
            normalization parameters not adapted, not decayed).
        lr: learning rate > 0: a float, or a 0-d tensor (as torch's optimizers take it) that a
            scheduler writes in place and the step reads on the device. TVLARS uses no warm-up:
            this is the rate from the first step.
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: >= 0, folded into the update ``u = g + weight_decay * w``.
        trust_coefficient: ``eta`` > 0 of the trust ratio ``eta * ||w|| / ||u||``.
        phase: phi(t), a :class:`~lightning_tvlars.SigmoidPhase` or any callable
            ``step -> float``; ``None`` means phi == 1, i.e. plain LARS.
        norm_clip: if set (> 0), ``||w||`` and ``||u||`` are each clamped to at most this value
            before the ratio, as in the authors' code.
        nesterov: Nesterov momentum (timm's ``nlars``); needs ``momentum > 0``.
        maximize: ascend the objective instead of descending it.
        foreach: ``None`` (default) or ``True``: the multi-tensor path (a fixed number of
            kernels whatever the number of tensors on CUDA, cache-sized batches on CPU);
            ``True`` raises on devices without torch's fused kernels, where ``None`` takes the
            elementwise path. ``False``: the elementwise reference path. Either way, tensors
            whose layout the fused kernels cannot take (views with gaps, gradients with other
            strides than their parameter) and 16-bit tensors (computed in float32) take the
            elementwise path.
        capturable: keep t, the learning rates and phi(t) on the parameters' device (float
            rates become 0-d tensors there; phi is computed there from t, see
            :meth:`~lightning_tvlars.SigmoidPhase.tensor`), so that a step reads nothing on the
            host and can be captured in a CUDA graph or compiled once for a whole run. Costs a
            few scalar kernels per step; see "Capturable step and CUDA graphs" in the docs.
        compiled: run the update (everything but the closure) compiled by
            ``torch.compile(fullgraph=True)``; implies ``capturable=True``, so that it compiles
            once, on the first step (seconds to minutes, see "torch.compile?" in the FAQ, which
            lists what compiles it again), not when the rate and phi change. Where Lightning
            passes a closure to ``step`` (forward and backward), only the update is compiled.
            On one CPU thread the compiled step takes 0.6x the eager one's time. Refused with
            sharded parameters (FSDP, DTensor), whose norms need collectives: DDP is fine.

    The step count t is stored in every parameter group (``group["step"]``), so it travels with
    ``state_dict()`` under every checkpointing scheme and loads with
    ``torch.load(..., weights_only=True)``. It counts ``step()`` calls: steps that are skipped
    (see below) and steps without any gradient count too, so t always equals the number of
    ``scaler.step(optimizer)`` calls, an LR scheduler's count and Lightning's ``global_step``
    for one optimizer.

    Skipped steps: if any ``g + weight_decay * w`` holds ``inf`` or ``nan``, or a
    ``torch.amp.GradScaler`` found ``inf``/``nan`` in the scaled gradients, the whole step is a
    no-op on the device (weights and momentum unchanged, no host sync) and
    :attr:`last_step_stats` reports ``skipped``.

    Mixed precision: TVLARS unscales inside its step (``_step_supports_amp_scaling``), so
    ``scaler.step(optimizer)`` costs no host sync; the gradients are unscaled in place, as
    ``scaler.unscale_`` would leave them. With sharded parameters (FSDP) it leaves unscaling
    to the scaler, whose ``ShardedGradScaler.unscale_`` keeps all ranks' skip decisions and
    scales equal.

    Examples:
        >>> import torch
        >>> from lightning_tvlars import SigmoidPhase, TVLARS, param_groups
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
        >>> opt = TVLARS(param_groups(model, weight_decay=5e-4), lr=1.0,
        ...              phase=SigmoidPhase(decay=1e-2, delay=100))
        >>> model(torch.randn(16, 8)).square().mean().backward()
        >>> opt.step()
        >>> opt.step_count, round(opt.last_step_stats.phase, 3)
        (1, 0.731)
    """

    OPTIONS = (
        "lr",
        "momentum",
        "weight_decay",
        "trust_coefficient",
        "norm_clip",
        "adapt",
        "nesterov",
        "maximize",
        "foreach",
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        phase: Phase = None,
        norm_clip: float | None = None,
        *,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        compiled: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "norm_clip": norm_clip,
            "adapt": True,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
        }
        super().__init__(params, defaults, phase, capturable, compiled)

    @classmethod
    def reference(
        cls, params: nn.Module | Iterable[Tensor], lr: float, decay: float, **overrides: Any
    ) -> TVLARS:
        """The authors' configuration (KhoiDOO/tvlars, ``opt/tvlars.py``).

        ``phi = 1 / (0.1 + exp(decay * (t + 1)))``, both norms clamped to 10, ``eta = 1e-3``,
        momentum 0.9, weight decay 5e-4, biases and normalization parameters neither adapted nor
        decayed. Given a module, groups come from :func:`param_groups`; given tensors, from their
        ``ndim`` as in the authors' code (1-D tensors excluded). ``overrides`` replace any
        constructor argument, in every group (``weight_decay`` too).
        """
        kwargs: dict[str, Any] = {
            "momentum": 0.9,
            "weight_decay": _REFERENCE_WEIGHT_DECAY,
            "trust_coefficient": 1e-3,
            "phase": SigmoidPhase.reference(decay),
            "norm_clip": _REFERENCE_NORM_CLIP,
            **overrides,
        }
        decay_rate = kwargs["weight_decay"]
        if isinstance(params, nn.Module):
            groups = param_groups(params, weight_decay=decay_rate)
        else:
            groups = split_by_ndim(params, decay_rate)
        return cls(groups, lr=lr, **kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_unit_interval("momentum", group["momentum"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive("trust_coefficient", group["trust_coefficient"])
        if group["norm_clip"] is not None:
            check_positive("norm_clip", group["norm_clip"])
        for key in ("adapt", "nesterov", "maximize"):
            if not isinstance(group[key], bool):
                raise TypeError(f"{key}={group[key]!r} is invalid: expected True or False")
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError(
                f"nesterov=True is invalid with momentum={group['momentum']!r}: Nesterov "
                "momentum needs momentum > 0"
            )

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        if group["momentum"] != 0 and "momentum_buffer" not in self.state[p]:
            self.state[p]["momentum_buffer"] = torch.zeros_like(
                p, memory_format=torch.preserve_format
            )

    def _update(self) -> None:
        groups = []
        for group, tensors in zip(self.param_groups, self._gather(), strict=True):
            if not tensors.params:
                continue
            buffers = (
                [local_tensor(self.state[p]["momentum_buffer"]) for p in tensors.params]
                if group["momentum"] != 0
                else []
            )
            groups.append(
                LarsGroup(
                    *tensors,
                    momentum_buffers=buffers,
                    **{k: group[k] for k in self.OPTIONS},
                )
            )
        device = groups[0].weights[0].device if groups else torch.device("cpu")
        phase = self._phase_value(device)
        result = (
            tvlars(
                groups,
                phase=phase,
                reduce=self.reduce_norms,
                found_inf=self._found_inf(),
                layouts=self._layouts,
            )
            if groups
            else empty_result()
        )
        self._finish(phase, result)


def tvlars(
    groups: Sequence[LarsGroup],
    *,
    phase: float | Tensor = 1.0,
    reduce: Reduce = no_reduction,
    found_inf: Tensor | None = None,
    layouts: LayoutCache | None = None,
) -> StepResult:
    """One TVLARS step of ``groups`` (see the module docstring for the rule).

    Args:
        groups: each group's tensors and options; every tensor has a gradient.
        phase: phi(t) for the adapted tensors (a 0-d tensor under ``torch.compile``).
        reduce: full-tensor norms from local ones (sharded parameters).
        found_inf: GradScaler's verdict; the step is skipped on the device when it is > 0.
        layouts: the multi-tensor layouts kept between steps (built afresh when None).
    """
    cache = layouts if layouts is not None else LayoutCache()
    work = [
        (group, bucket)
        for group in groups
        for bucket in cache.buckets(
            group.params,
            group.weights,
            group.grads,
            [group.momentum_buffers] if group.momentum_buffers else [],
            foreach=group.foreach,
            workspaces=int(group.adapt or group.weight_decay != 0),
        )
    ]
    result = layerwise_step(
        work,
        directions=_directions,
        ratio=_ratio,
        apply=_apply,
        phase=phase,
        reduce=reduce,
        found_inf=found_inf,
    )
    cache.end_step()
    return result


def _ratio(group: LarsGroup, weight_norm: Tensor, update_norm: Tensor) -> Tensor:
    return trust_ratio(weight_norm, update_norm, group.trust_coefficient, group.norm_clip)


def _directions(group: LarsGroup, bucket: Bucket) -> Formed:
    if bucket.layout is None:
        return _single_tensor_directions(group, bucket.members)
    return _multi_tensor_directions(group, bucket.layout)


def _apply(
    group: LarsGroup, bucket: Bucket, carry: Any, scale: Tensor | None, skipped: Tensor
) -> None:
    if bucket.layout is None:
        _single_tensor_apply(group, bucket.members, carry, scale, skipped)
    else:
        _multi_tensor_apply(group, bucket.layout, carry, scale, skipped)


# ---------------------------------------------------------------------- elementwise


def _single_tensor_directions(group: LarsGroup, index: list[int]) -> Formed:
    """``u = ±g + weight_decay * w`` per tensor, in float32 for 16-bit tensors."""
    weights = [group.weights[i] for i in index]
    updates = []
    for i, w in zip(index, weights, strict=True):
        dtype = compute_dtype(w.dtype)
        u = group.grads[i].to(dtype)
        if group.maximize:
            u = -u
        if group.weight_decay != 0:
            u = u + w.to(dtype) * group.weight_decay
        updates.append(u)
    dtype, device = accumulation_dtype(weights), weights[0].device
    return Formed(*pair_norms(weights, updates, dtype, device), updates)


def _single_tensor_apply(
    group: LarsGroup,
    index: list[int],
    updates: list[Tensor],
    scale: Tensor | None,
    skipped: Tensor,
) -> None:
    """``b = m b + s u; w -= lr (b, or s u + m b with Nesterov)``, unless ``skipped``."""
    for k, (i, u) in enumerate(zip(index, updates, strict=True)):
        w = group.weights[i]
        keep = skipped.to(w.device)
        if scale is not None:
            u = u * scale[k].to(w.device, u.dtype)
        step = u
        if group.momentum_buffers:
            buffer = group.momentum_buffers[i]
            new = buffer.to(u.dtype) * group.momentum + u
            buffer.copy_(torch.where(keep, buffer, new))
            step = u + group.momentum * new if group.nesterov else new
        w.copy_(torch.where(keep, w, w.to(u.dtype) - group.lr * step))


# ---------------------------------------------------------------------- multi-tensor


def _form(group: LarsGroup, layout: Layout, batch: Batch, grads: list[Tensor]) -> list[Tensor]:
    """``u = g ± weight_decay * w`` in the batch's workspace (the gradients themselves without
    one). With ``maximize`` the sign of the decay flips: the fused kernel negates ``u``."""
    if not batch.views:
        return grads
    (views,) = batch.views
    decay = -group.weight_decay if group.maximize else group.weight_decay
    if layout.per_tensor:  # one pass per tensor, no fresh output
        for view, g, w in zip(views, grads, batch.weights, strict=True):
            torch.add(g, w, alpha=decay, out=view) if decay != 0 else view.copy_(g)
        return views
    torch._foreach_copy_(views, grads)
    if decay != 0:
        torch._foreach_add_(views, batch.weights, alpha=decay)
    return views


def _multi_tensor_directions(group: LarsGroup, layout: Layout) -> Formed:
    """Batch by batch: ``u`` in the workspace, then the norms of ``w`` and ``u`` while they are
    in cache. Returns the gradients cut into the batches' entries."""
    grads = [batch.cut([group.grads[i] for i in layout.members]) for batch in layout.batches]
    dtype = accumulation_dtype(layout.batches[0].weights)
    weight_norms: list[Tensor] = []
    update_norms: list[Tensor] = []
    for batch, g in zip(layout.batches, grads, strict=True):
        updates = _form(group, layout, batch, g)
        norms = torch._foreach_norm([*batch.weights, *updates], 2, dtype=dtype)
        weight_norms += norms[: len(g)]
        update_norms += norms[len(g) :]
    return Formed(
        layout.tensor_norms(torch.stack(weight_norms)),
        layout.tensor_norms(torch.stack(update_norms)),
        grads,
    )


def _multi_tensor_apply(
    group: LarsGroup,
    layout: Layout,
    grads: list[list[Tensor]],
    scale: Tensor | None,
    skipped: Tensor,
) -> None:
    """Per batch, backwards: torch's fused momentum-SGD kernel on ``s u`` (a no-op when
    ``found_inf``). With cache-sized batches (CPU) the shared workspace still holds the last
    batch's ``u`` (and that batch is still in cache); the others form it again.

    ``s u``: tensor by tensor (CPU, float32) the kernel divides ``u`` by its ``grad_scale``
    ``1 / s`` as it reads it (one pass over the workspace fewer, 5-8% of a CPU step; the kernels
    take a float32 scale only); otherwise the workspace is scaled per block first, one
    multi-tensor call for the batch (a fixed number of kernels on accelerators)."""
    first = layout.batches[0]
    device, dtype = first.owner.device, first.weights[0].dtype
    found_inf = skipped.to(device, torch.float32)
    lr = kernel_lr(group.lr, device)
    if scale is not None:
        scale = scale.to(device, dtype)
    folded = scale is not None and layout.per_tensor and dtype == torch.float32
    inverse = scale.reciprocal().unbind() if folded and scale is not None else ()  # 1 / s
    for k, (batch, g) in enumerate(reversed(list(zip(layout.batches, grads, strict=True)))):
        updates = _form(group, layout, batch, g) if k > 0 else (batch.views or [g])[0]
        buffers = batch.state[0] if group.momentum_buffers else []
        if folded:
            for j, position in enumerate(batch.positions):
                one = [buffers[j]] if buffers else []
                by = inverse[position]
                _fused_sgd(group, [batch.weights[j]], [updates[j]], one, lr, found_inf, by)
            continue
        if scale is not None:
            batch.matrices[0].mul_(scale.index_select(0, batch.owner).unsqueeze(1))
        _fused_sgd(group, batch.weights, updates, buffers, lr, found_inf)


def _fused_sgd(
    group: LarsGroup,
    weights: list[Tensor],
    updates: list[Tensor],
    buffers: list[Tensor],
    lr: float | Tensor,
    found_inf: Tensor,
    grad_scale: Tensor | None = None,
) -> None:
    """``b = m b + u / grad_scale; w -= lr (b, or u + m b with Nesterov)``: torch's kernel (which
    writes ``u / grad_scale`` back into ``updates``, the workspace)."""
    torch._fused_sgd_(
        weights,
        updates,
        buffers,
        weight_decay=0.0,
        momentum=group.momentum,
        lr=lr,
        dampening=0.0,
        nesterov=group.nesterov,
        maximize=group.maximize,
        is_first_step=False,  # buffers start at zero: m * 0 + u == u
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
