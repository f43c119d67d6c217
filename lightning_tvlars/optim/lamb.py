r"""LAMB (You et al., arXiv 1904.00962) with an optional phase: time-varying LAMB.

For step :math:`t` (the tensor's own count :math:`k` of updates taken, for bias correction) and
every tensor :math:`w` with gradient :math:`g` in a group with learning rate :math:`\eta_{lr}`,
betas :math:`\beta_1, \beta_2`, weight decay :math:`\lambda`:

.. math::

    \hat g &= g / c \qquad (c = \max(1, \|g\|_{\text{all}} / \text{max\_grad\_norm})) \\
    m &\leftarrow \beta_1 m + (1 - \beta_1) \hat g, \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2) \hat g^2 \\
    u &= \frac{m / (1 - \beta_1^{k})}{\sqrt{v / (1 - \beta_2^{k})} + \epsilon} + \lambda w \\
    r &= \|w\| / \|u\| \quad (1 \text{ if either norm is } 0;\ \min(r, 1)
    \text{ with trust\_clip}) \\
    w &\leftarrow w - \eta_{lr}\, \phi(t)\, r\, u

Tensors that are not adapted take :math:`w \leftarrow w - \eta_{lr} u` (Adam with L2 decay
folded in). With ``decoupled_decay=True`` the decay leaves :math:`u` and is applied as
:math:`w \leftarrow (1 - \eta_{lr} \lambda) w` first (the ratio then sees the decayed weight), as
in timm. ``phase=None`` gives LAMB exactly as timm's ``Lamb`` computes it (same argument names
and defaults); a :class:`~lightning_tvlars.SigmoidPhase` multiplies the trust ratio of the
adapted tensors, as TVLARS does for LARS.

:class:`LAMB` holds the options and the state; :func:`lamb` is the update, in the same two
implementations as :func:`~lightning_tvlars.optim.tvlars.tvlars`. The multi-tensor one forms
:math:`u` with torch's fused Adam kernel on copies of the moments (so nothing is committed
before the skip decision), then updates the weights with torch's fused SGD kernel and commits the
moments with the fused Adam kernel again (``lr=0``), both no-ops on the device when the step is
skipped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lightning_tvlars._validation import check_non_negative, check_positive, check_unit_interval
from lightning_tvlars.optim.base import LayerwiseOptimizer, Phase
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
    tensor_norms,
    trust_ratio,
)
from lightning_tvlars.optim.workspace import Batch, Bucket, Layout, LayoutCache

#: Most elements per batch on accelerators: bounds the three or four group-sized workspaces the
#: multi-tensor path needs (the kernel count grows with the model's size over this, never with
#: its number of tensors).
ACCELERATOR_BATCH = 1 << 25


class LambGroup(NamedTuple):
    """One parameter group's tensors and options, as :func:`lamb` takes them."""

    params: list[Tensor]  # as held (DTensor, FSDP1 views): the norms' reduction and statistics
    weights: list[Tensor]  # their local tensors, read and written
    grads: list[Tensor]  # local, laid out like the weights
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]  # float32 0-d tensors on the device: updates taken by each tensor
    lr: float | Tensor  # a tensor: read by the kernels on the device
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    adapt: bool
    bias_correction: bool = True
    grad_averaging: bool = True
    trust_clip: bool = False
    decoupled_decay: bool = False
    maximize: bool = False
    foreach: bool | None = None


class LAMB(LayerwiseOptimizer):
    """LAMB, a drop-in for timm's ``Lamb``, with the family's phase, groups and guarantees.

    Args:
        params: tensors, or parameter groups (dicts) with the options below (but ``phase`` and
            ``max_grad_norm``) and ``adapt``: True (trust ratio and phase), False (Adam with
            the decay folded in), or None (default), timm's rule: adapted when
            ``weight_decay != 0`` or ``always_adapt``. :func:`~lightning_tvlars.param_groups`
            sets it (biases and normalization parameters neither adapted nor decayed). Any
            other key is carried along.
        lr: learning rate > 0: a float or a 0-d tensor (see :class:`~lightning_tvlars.TVLARS`).
        bias_correction: divide the moments by ``1 - beta^k``.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: > 0, added to the root of the second moment.
        weight_decay: >= 0 (see ``decoupled_decay``).
        grad_averaging: ``m = beta1 m + (1 - beta1) g``; False: ``m = beta1 m + g``.
        max_grad_norm: clip the gradients of all groups together by their global norm before
            the moments (``None``: no clipping). Global: one value for the optimizer.
        trust_clip: clamp the trust ratio to at most 1 (LAMBC).
        always_adapt: adapt groups without weight decay too (when their ``adapt`` is None).
        decoupled_decay: decay the weights by ``1 - lr * weight_decay`` instead of adding
            ``weight_decay * w`` to the update.
        phase: phi(t) multiplying the trust ratio of adapted tensors (``None``: phi == 1, LAMB).
        maximize: ascend the objective instead of descending it.
        foreach: as :class:`~lightning_tvlars.TVLARS`'s; ``grad_averaging=False`` and
            ``bias_correction=False`` take the elementwise path.
        capturable: t, the learning rates and phi(t) on the device, as
            :class:`~lightning_tvlars.TVLARS`'s (the tensors' update counts are there anyway).
        compiled: the update compiled, as :class:`~lightning_tvlars.TVLARS`'s (on one CPU
            thread: 0.5-0.6x the eager step's time).

    Skipped steps, the step clock, mixed precision and sharding behave as in
    :class:`~lightning_tvlars.TVLARS`; a skipped step leaves the moments and the tensors'
    update counts unchanged too. With ``max_grad_norm`` under sharding, the global gradient
    norm costs one more collective, before the moments (it scales them).

    Examples:
        >>> import torch
        >>> from lightning_tvlars import LAMB, param_groups
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
        >>> opt = LAMB(param_groups(model, weight_decay=0.01), lr=1e-3)
        >>> model(torch.randn(16, 8)).square().mean().backward()
        >>> opt.step()
        >>> opt.step_count, opt.last_step_stats.adapted
        (1, (True, False, False, False))
    """

    OPTIONS = (
        "lr",
        "bias_correction",
        "betas",
        "eps",
        "weight_decay",
        "grad_averaging",
        "max_grad_norm",
        "trust_clip",
        "always_adapt",
        "decoupled_decay",
        "adapt",
        "maximize",
        "foreach",
    )
    REFUSED: ClassVar[dict[str, object]] = {
        **LayerwiseOptimizer.REFUSED,
        "momentum": 0,
        "nesterov": False,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        decoupled_decay: bool = False,
        phase: Phase = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        compiled: bool = False,
    ) -> None:
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        defaults = {
            "lr": lr,
            "bias_correction": bias_correction,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "grad_averaging": grad_averaging,
            "max_grad_norm": max_grad_norm,
            "trust_clip": trust_clip,
            "always_adapt": always_adapt,
            "decoupled_decay": decoupled_decay,
            "adapt": None,
            "maximize": maximize,
            "foreach": foreach,
        }
        super().__init__(params, defaults, phase, capturable, compiled)

    def _check_group(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise TypeError(f"betas={betas!r} is invalid: expected a pair (beta1, beta2)")
        check_unit_interval("betas[0]", betas[0])
        check_unit_interval("betas[1]", betas[1])
        check_positive("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        flags = ("bias_correction", "grad_averaging", "trust_clip", "always_adapt")
        for key in (*flags, "decoupled_decay", "maximize"):
            if not isinstance(group[key], bool):
                raise TypeError(f"{key}={group[key]!r} is invalid: expected True or False")
        if group["adapt"] not in (None, True, False):
            raise TypeError(f"adapt={group['adapt']!r} is invalid: expected True, False or None")
        if group["max_grad_norm"] != self.defaults["max_grad_norm"]:
            raise ValueError(
                f"max_grad_norm={group['max_grad_norm']!r} in a group is invalid: the clip is "
                "global (all groups' gradients together); set it on the optimizer"
            )

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "step" not in state:
            device = local_tensor(p).device
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @staticmethod
    def _adapted(group: dict[str, Any]) -> bool:
        if group["adapt"] is not None:
            return bool(group["adapt"])
        return bool(group["weight_decay"] != 0 or group["always_adapt"])

    def _update(self) -> None:
        groups = []
        for group, tensors in zip(self.param_groups, self._gather(), strict=True):
            if not tensors.params:
                continue
            state = [self.state[p] for p in tensors.params]
            groups.append(
                LambGroup(
                    *tensors,
                    exp_avgs=[local_tensor(s["exp_avg"]) for s in state],
                    exp_avg_sqs=[local_tensor(s["exp_avg_sq"]) for s in state],
                    steps=[s["step"] for s in state],
                    lr=group["lr"],
                    beta1=group["betas"][0],
                    beta2=group["betas"][1],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    adapt=self._adapted(group),
                    bias_correction=group["bias_correction"],
                    grad_averaging=group["grad_averaging"],
                    trust_clip=group["trust_clip"],
                    decoupled_decay=group["decoupled_decay"],
                    maximize=group["maximize"],
                    foreach=group["foreach"],
                )
            )
        device = groups[0].weights[0].device if groups else torch.device("cpu")
        phase = self._phase_value(device)
        result = (
            lamb(
                groups,
                max_grad_norm=self.defaults["max_grad_norm"],
                phase=phase,
                reduce=self.reduce_norms,
                found_inf=self._found_inf(),
                layouts=self._layouts,
            )
            if groups
            else empty_result()
        )
        self._finish(phase, result)


def lamb(
    groups: Sequence[LambGroup],
    *,
    max_grad_norm: float | None = None,
    phase: float | Tensor = 1.0,
    reduce: Reduce = no_reduction,
    found_inf: Tensor | None = None,
    layouts: LayoutCache | None = None,
) -> StepResult:
    """One LAMB step of ``groups`` (see the module docstring for the rule).

    Args:
        groups: each group's tensors and options; every tensor has a gradient.
        max_grad_norm: the global gradient clip (None: none).
        phase: phi(t) for the adapted tensors (a 0-d tensor under ``torch.compile``).
        reduce: full-tensor norms from local ones (sharded parameters).
        found_inf: GradScaler's verdict; the step is skipped on the device when it is > 0.
        layouts: the multi-tensor layouts kept between steps (built afresh when None).
    """
    clip = None if max_grad_norm is None else _clip_factor(groups, max_grad_norm, reduce)
    cache = layouts if layouts is not None else LayoutCache()
    work = [
        (group, bucket)
        for group in groups
        for bucket in cache.buckets(
            group.params,
            group.weights,
            group.grads,
            [group.exp_avgs, group.exp_avg_sqs],
            foreach=group.foreach if group.grad_averaging and group.bias_correction else False,
            workspaces=3 if clip is None else 4,
            accelerator_batch=ACCELERATOR_BATCH,
        )
    ]
    result = layerwise_step(
        work,
        directions=functools.partial(_directions, clip=clip),
        ratio=_ratio,
        apply=functools.partial(_apply, clip=clip),
        phase=phase,
        reduce=reduce,
        found_inf=found_inf,
    )
    cache.end_step()
    return result


def _clip_factor(groups: Sequence[LambGroup], max_grad_norm: float, reduce: Reduce) -> Tensor:
    """``max(1, ||g||_all / max_grad_norm)`` over every group's gradients (one reduction)."""
    params = [p for group in groups for p in group.params]
    grads = [g for group in groups for g in group.grads]
    device = groups[0].weights[0].device
    norms = reduce(params, tensor_norms(grads, accumulation_dtype(grads), device))
    return (torch.linalg.vector_norm(norms) / max_grad_norm).clamp(min=1.0)


def _kernel_grads(
    layout: Layout, batch: Batch, grads: list[Tensor], clip: Tensor | None, *, form: bool
) -> list[Tensor]:
    """The gradients the fused kernels read: ``g``, or ``g / c`` in the fourth workspace when
    clipping (formed when ``form``). Not the kernels' own ``grad_scale``: they write the
    divided gradient back into what they read, and read the scale in float32 only."""
    if clip is None:
        return grads
    if form:
        _fill(layout, batch, 3, grads, divisor=clip.to(batch.owner.device, batch.matrices[3].dtype))
    return batch.views[3]


def _ratio(group: LambGroup, weight_norm: Tensor, update_norm: Tensor) -> Tensor:
    if group.decoupled_decay and group.weight_decay != 0:
        weight_norm = weight_norm * (1.0 - group.lr * group.weight_decay)  # after the decay
    return trust_ratio(weight_norm, update_norm, max_ratio=1.0 if group.trust_clip else None)


def _directions(group: LambGroup, bucket: Bucket, *, clip: Tensor | None) -> Formed:
    if bucket.layout is None:
        return _single_tensor_directions(group, bucket.members, clip)
    return _multi_tensor_directions(group, bucket.layout, clip)


def _apply(
    group: LambGroup,
    bucket: Bucket,
    carry: Any,
    scale: Tensor | None,
    skipped: Tensor,
    *,
    clip: Tensor | None,
) -> None:
    if bucket.layout is None:
        _single_tensor_apply(group, bucket.members, carry, scale, skipped)
    else:
        _multi_tensor_apply(group, bucket.layout, carry, scale, skipped, clip)


def _decays_update(group: LambGroup) -> bool:
    """Whether ``weight_decay * w`` is part of the update direction."""
    return group.weight_decay != 0 and not group.decoupled_decay


# ---------------------------------------------------------------------- elementwise


def _single_tensor_directions(group: LambGroup, index: list[int], clip: Tensor | None) -> Formed:
    """New moments and ``u`` per tensor (nothing committed), in float32 for 16-bit tensors."""
    weights = [group.weights[i] for i in index]
    carry = []
    corrections = _bias_corrections(group, index) if group.bias_correction else []
    for j, (i, w) in enumerate(zip(index, weights, strict=True)):
        dtype = compute_dtype(w.dtype)
        g = group.grads[i].to(dtype)
        if group.maximize:
            g = -g
        if clip is not None:
            g = g / clip.to(g.device, dtype)
        m = group.exp_avgs[i].to(dtype)
        m = m.lerp(g, 1.0 - group.beta1) if group.grad_averaging else m * group.beta1 + g
        v = (group.exp_avg_sqs[i].to(dtype) * group.beta2).addcmul(g, g, value=1.0 - group.beta2)
        correction = corrections[j] if corrections else None
        carry.append((m, v, _direction(group, m, v, w, correction), correction))
    dtype, device = accumulation_dtype(weights), weights[0].device
    return Formed(*pair_norms(weights, [u for _, _, u, _ in carry], dtype, device), carry)


def _direction(
    group: LambGroup, m: Tensor, v: Tensor, w: Tensor, correction: tuple[Tensor, Tensor] | None
) -> Tensor:
    """``u = m_hat / (sqrt(v_hat) + eps)``, plus ``weight_decay * w`` where the decay is not
    decoupled, in the moments' dtype."""
    if correction is not None:
        inverse1, inverse2 = (c.to(m.dtype) for c in correction)
        u = (m * inverse1) / (v.sqrt() * inverse2 + group.eps)
    else:
        u = m / (v.sqrt() + group.eps)
    if _decays_update(group):
        u = u + w.to(m.dtype) * group.weight_decay
    return u


def _bias_corrections(group: LambGroup, index: list[int]) -> list[tuple[Tensor, Tensor]]:
    """``(1 / (1 - beta1^k), 1 / sqrt(1 - beta2^k))`` of each tensor (``k`` its update count
    + 1), in float64, computed for all tensors of a device at once: per tensor, Inductor inlines
    the float64 ``pow`` into every element's loop (a compiled LAMB step 2.7x slower on CPU), and
    an element then multiplies by them instead of dividing (compiled: 0.5-0.6x the time)."""
    by_device: dict[torch.device, list[int]] = {}
    for j, i in enumerate(index):
        by_device.setdefault(group.steps[i].device, []).append(j)
    corrections: dict[int, tuple[Tensor, Tensor]] = {}
    for positions in by_device.values():
        k = torch.stack([group.steps[index[j]] for j in positions]).to(torch.float64) + 1.0
        # One stacked tensor, which Inductor computes once (two separate ones it inlines into
        # every element's loop again: 3x the compiled step's time).
        if torch.compiler.is_compiling():
            # The betas as a tensor, so that they are constants of the graph: a scheduler that
            # changes them (OneCycleLR's momentum cycling) recompiles it. Passed as symbolic
            # floats instead, beta ** k kept the first call's value (Inductor, torch 2.14).
            betas = torch.tensor([group.beta1, group.beta2], dtype=k.dtype, device=k.device)
            powers = betas ** k.unsqueeze(1)
        else:
            powers = torch.stack([group.beta1**k, group.beta2**k], dim=1)
        both = torch.stack([1.0 / (1.0 - powers[:, 0]), (1.0 - powers[:, 1]).rsqrt()], dim=1)
        for j, pair in zip(positions, both.unbind(), strict=True):
            inverse1, inverse2 = pair.unbind()
            corrections[j] = (inverse1, inverse2)
    return [corrections[j] for j in range(len(index))]


def _single_tensor_apply(
    group: LambGroup,
    index: list[int],
    carry: list[tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]],
    scale: Tensor | None,
    skipped: Tensor,
) -> None:
    """Commit the moments and ``w -= lr s u`` (after the decoupled decay), unless skipped.

    Compiled, ``u`` is formed again from the moments (the same bits): carried over, Inductor
    writes it out in the norms' pass and reads it back here, two more passes over memory than
    one pass that commits the moments and the weight together."""
    for k, (i, (m, v, u, correction)) in enumerate(zip(index, carry, strict=True)):
        w = group.weights[i]
        if torch.compiler.is_compiling():
            u = _direction(group, m, v, w, correction)
        keep = skipped.to(w.device)
        group.exp_avgs[i].copy_(torch.where(keep, group.exp_avgs[i], m))
        group.exp_avg_sqs[i].copy_(torch.where(keep, group.exp_avg_sqs[i], v))
        group.steps[i].add_(keep.logical_not().to(group.steps[i].dtype))
        new = w.to(u.dtype)
        if group.decoupled_decay and group.weight_decay != 0:
            new = new * (1.0 - group.lr * group.weight_decay)
        if scale is not None:
            u = u * scale[k].to(w.device, u.dtype)
        w.copy_(torch.where(keep, w, new - group.lr * u))


# ---------------------------------------------------------------------- multi-tensor


def _form(
    group: LambGroup,
    layout: Layout,
    batch: Batch,
    grads: list[Tensor],
    steps: Sequence[Tensor],
    clip: Tensor | None,
) -> None:
    """``u`` in the batch's first workspace, from copies of the moments in the next two (the
    moments themselves are not touched) by torch's fused Adam kernel run with ``lr=-1`` on
    ``weight_decay * w`` (or zeros)."""
    grads = _kernel_grads(layout, batch, grads, clip, form=True)
    exp_avgs = _fill(layout, batch, 1, batch.state[0])
    exp_avg_sqs = _fill(layout, batch, 2, batch.state[1])
    if _decays_update(group):
        updates = _fill(layout, batch, 0, batch.weights, factor=group.weight_decay)
    else:
        updates = batch.views[0]
        batch.matrices[0].zero_()
    torch._fused_adam_(
        updates,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        [steps[k] for k in batch.positions],
        lr=-1.0,
        beta1=group.beta1,
        beta2=group.beta2,
        weight_decay=0.0,
        eps=group.eps,
        amsgrad=False,
        maximize=group.maximize,
    )


def _fill(
    layout: Layout,
    batch: Batch,
    workspace: int,
    tensors: list[Tensor],
    *,
    factor: float | None = None,
    divisor: Tensor | None = None,
) -> list[Tensor]:
    """Workspace ``workspace`` of the batch ``= tensors`` (times ``factor``, divided by
    ``divisor``): tensor by tensor, one pass each, where the layout is handled so; else one
    multi-tensor copy, then one pass over the workspace's block matrix (the same arithmetic,
    element by element)."""
    out = batch.views[workspace]
    if layout.per_tensor:
        for o, t in zip(out, tensors, strict=True):
            if factor is not None:
                torch.mul(t, factor, out=o)
            elif divisor is not None:
                torch.div(t, divisor, out=o)
            else:
                o.copy_(t)
        return out
    torch._foreach_copy_(out, tensors)
    if factor is not None:
        batch.matrices[workspace].mul_(factor)
    elif divisor is not None:
        batch.matrices[workspace].div_(divisor)
    return out


def _multi_tensor_directions(group: LambGroup, layout: Layout, clip: Tensor | None) -> Formed:
    """Batch by batch: ``u`` in the workspace (see :func:`_form`), then the norms of ``w`` and
    ``u`` while they are in cache. Returns the gradients cut into the batches' entries and the
    update counts the kernels read (``k + 1``)."""
    grads = [batch.cut([group.grads[i] for i in layout.members]) for batch in layout.batches]
    steps = torch._foreach_add([group.steps[i] for i in layout.members], 1.0)
    dtype = accumulation_dtype(layout.batches[0].weights)
    weight_norms: list[Tensor] = []
    update_norms: list[Tensor] = []
    for batch, g in zip(layout.batches, grads, strict=True):
        _form(group, layout, batch, g, steps, clip)
        norms = torch._foreach_norm([*batch.weights, *batch.views[0]], 2, dtype=dtype)
        weight_norms += norms[: len(g)]
        update_norms += norms[len(g) :]
    return Formed(
        layout.tensor_norms(torch.stack(weight_norms)),
        layout.tensor_norms(torch.stack(update_norms)),
        grads,
    )


def _multi_tensor_apply(
    group: LambGroup,
    layout: Layout,
    grads: list[list[Tensor]],
    scale: Tensor | None,
    skipped: Tensor,
    clip: Tensor | None,
) -> None:
    """Per batch, backwards, every kernel a no-op when ``found_inf``: the decoupled decay, then

    * tensor by tensor (CPU): torch's fused AdamW kernel with the learning rate ``lr * s`` of
      each tensor, which commits the moments and applies ``w -= lr s u`` in one pass (``u`` is
      not needed again: the kernel forms it from the same moments);
    * otherwise: ``u`` (still in the workspace, or formed again) scaled per block, ``w -= lr u``
      by the fused SGD kernel, and the moments committed by the fused Adam kernel run with
      ``lr=0`` on the workspace.

    With several batches the workspaces hold the last one only: ``g / c`` (clipping) and ``u``
    are formed again for the others where they are needed."""
    first = layout.batches[0]
    device, dtype = first.owner.device, first.weights[0].dtype
    found_inf = skipped.to(device, torch.float32)
    steps = [group.steps[i] for i in layout.members]
    # a list operand: with one 0-d tensor torch's CPU kernel reads it on the host (.item())
    torch._foreach_add_(steps, [skipped.logical_not().to(device, steps[0].dtype)] * len(steps))
    keep = skipped.logical_not().to(device, dtype)
    decay = None
    if group.decoupled_decay and group.weight_decay != 0:
        decay = (1.0 - keep * (group.lr * group.weight_decay)).to(dtype)
    rates: Sequence[Tensor | float] = [group.lr] * len(layout.members)
    if scale is not None:
        scale = scale.to(device, dtype)
        if layout.per_tensor:
            rates = (scale * group.lr).to(torch.float64).unbind()
    for k, (batch, g) in enumerate(reversed(list(zip(layout.batches, grads, strict=True)))):
        if k > 0 and not layout.per_tensor:
            _form(group, layout, batch, g, steps, clip)
        g = _kernel_grads(layout, batch, g, clip, form=k > 0 and layout.per_tensor)
        if decay is not None:
            torch._foreach_mul_(batch.weights, decay)
        if layout.per_tensor:
            _adamw_per_tensor(group, batch, g, steps, rates, found_inf)
            continue
        if scale is not None:
            batch.matrices[0].mul_(scale.index_select(0, batch.owner).unsqueeze(1))
        torch._fused_sgd_(
            batch.weights,
            batch.views[0],
            [],
            weight_decay=0.0,
            momentum=0.0,
            lr=kernel_lr(group.lr, device),
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,
            found_inf=found_inf,
        )
        torch._fused_adam_(
            batch.views[0],  # lr=0: the workspace is left as it is
            g,
            batch.state[0],
            batch.state[1],
            [],
            [steps[i] for i in batch.positions],
            lr=0.0,
            beta1=group.beta1,
            beta2=group.beta2,
            weight_decay=0.0,
            eps=group.eps,
            amsgrad=False,
            maximize=group.maximize,
            found_inf=found_inf,
        )


def _adamw_per_tensor(
    group: LambGroup,
    batch: Batch,
    grads: list[Tensor],
    steps: list[Tensor],
    rates: Sequence[Tensor | float],
    found_inf: Tensor,
) -> None:
    """``w <- w (1 - r lambda) - r d`` with each tensor's rate ``r = lr s`` (fused AdamW: the
    decay inside the direction when it is not decoupled), committing the moments."""
    decay = group.weight_decay if _decays_update(group) else 0.0
    for k, i in enumerate(batch.positions):
        torch._fused_adamw_(
            [batch.weights[k]],
            [grads[k]],
            [batch.state[0][k]],
            [batch.state[1][k]],
            [],
            [steps[i]],
            lr=rates[i],
            beta1=group.beta1,
            beta2=group.beta2,
            weight_decay=decay,
            eps=group.eps,
            amsgrad=False,
            maximize=group.maximize,
            found_inf=found_inf,
        )
