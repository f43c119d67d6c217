r"""The TVLARS optimizer (Do et al., arXiv 2309.14053).

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
and this is LARS in the form of Barlow Twins / SimCLR.

Two code paths compute the same update. The multi-tensor path (the default) takes one
``_foreach_norm`` pass for all norms, one ``_foreach_mul_`` per group for the per-tensor scale
and torch's fused momentum-SGD kernel for the buffer and weight update: a few dozen operators
per step whatever the number of tensors. The per-tensor path (``foreach=False``) forms each
update while the tensor is in cache and keeps no gradient-sized temporary alive, which is faster
on CPU for models of many mid-size tensors (ResNet) and slower for big matrices (it forms the
update twice); under ``torch.compile`` it is the path Inductor fuses. Neither reads a device
value on the host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from lightning_tvlars._validation import (
    check_non_negative,
    check_positive,
    check_unit_interval,
)
from lightning_tvlars.optim.groups import param_groups, split_by_ndim
from lightning_tvlars.optim.norms import (
    ReductionPlan,
    ShardGroups,
    accumulation_dtype,
    fsdp1_shard_groups,
    is_flat_parameter,
    local_gradients,
    local_norms,
    local_tensor,
)
from lightning_tvlars.phase import SigmoidPhase

#: Keys a parameter group may set: hyper-parameters, then metadata that is carried along.
GROUP_HYPERPARAMETERS = (
    "lr",
    "momentum",
    "weight_decay",
    "trust_coefficient",
    "norm_clip",
    "adapt",
)
GROUP_METADATA = ("params", "param_names", "name", "initial_lr")

_REFERENCE_WEIGHT_DECAY = 5e-4
_REFERENCE_NORM_CLIP = 10.0


def fused_kernel_supports(tensors: list[Tensor]) -> bool:
    """Whether torch's fused SGD kernel (and so the on-device skip) runs on these tensors."""
    supported = _get_fused_kernels_supported_devices()
    return all(t.device.type in supported for t in tensors)


def trust_ratio(
    weight_norm: Tensor,
    update_norm: Tensor,
    trust_coefficient: float,
    norm_clip: float | None = None,
) -> Tensor:
    """``eta * ||w|| / ||u||`` element-wise, and 1 where either norm is 0.

    With ``norm_clip`` both norms are clamped to at most ``norm_clip`` before the ratio (the
    authors' code uses 10). No host synchronisation: zero norms are handled with ``torch.where``.
    """
    w, u = weight_norm, update_norm
    if norm_clip is not None:
        w, u = w.clamp(max=norm_clip), u.clamp(max=norm_clip)
    return torch.where((weight_norm > 0) & (update_norm > 0), trust_coefficient * w / u, 1.0)


@dataclass(frozen=True)
class TVLARSStepStats:
    """What the last :meth:`TVLARS.step` computed, one entry per updated tensor.

    The tensors stay on the parameters' device; reading them (``.tolist()``) is one device to
    host copy, which is the monitor's business at its own log interval.

    Attributes:
        step: t of that step (0 for the first).
        phase: phi(t) as applied to adapted tensors (1.0 without a phase); a 0-d tensor when
            the step ran under ``torch.compile``.
        params: the updated parameters, in order.
        names: their names where the group has ``param_names``, else ``None``.
        adapted: whether each tensor got the trust ratio and phase.
        lr: the learning rate of each tensor's group.
        weight_norm: ``||w||`` before the update (float32).
        update_norm: ``||g + weight_decay * w||`` (float32).
        trust_ratio: ``r`` (without the phase), 1.0 for tensors that are not adapted.
        skipped: a bool scalar, True when a non-finite update made the step a no-op.
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
class _GroupView:
    """The tensors of one group updated this step: the parameters, and their local pieces."""

    group: dict[str, Any]
    params: list[Tensor]  # as the optimizer holds them (maybe DTensor / FSDP1 views)
    names: list[str | None]
    weights: list[Tensor]  # local tensors: what the kernels read and write
    grads: list[Tensor]
    buffers: list[Tensor]


@dataclass
class _LastStep:
    """The raw results of the last step, turned into :class:`TVLARSStepStats` on demand."""

    step: int
    phase: float | Tensor
    groups: list[tuple[list[Tensor], list[str | None], bool, float]]  # params, names, adapt, lr
    weight_norm: Tensor
    update_norm: Tensor
    ratios: list[Tensor | None]
    skipped: Tensor

    def stats(self) -> TVLARSStepStats:
        groups = self.groups
        pieces = [
            r if r is not None else self.weight_norm.new_ones(len(params))
            for (params, *_), r in zip(groups, self.ratios, strict=True)
        ]
        return TVLARSStepStats(
            step=self.step,
            phase=self.phase,
            params=tuple(p for params, *_ in groups for p in params),
            names=tuple(n for _, names, _, _ in groups for n in names),
            adapted=tuple(adapt for params, _, adapt, _ in groups for _ in params),
            lr=tuple(lr for params, _, _, lr in groups for _ in params),
            weight_norm=self.weight_norm,
            update_norm=self.update_norm,
            trust_ratio=torch.cat(pieces),
            skipped=self.skipped,
        )


class TVLARS(Optimizer):
    """Time-Varying LARS: LARS whose trust ratio is multiplied by a decaying phase phi(t).

    Args:
        params: tensors, or parameter groups (dicts). Group keys: ``lr``, ``momentum``,
            ``weight_decay``, ``trust_coefficient``, ``norm_clip``, ``adapt``; groups may also
            carry ``param_names`` and ``name``. :func:`~lightning_tvlars.param_groups` builds
            the usual split (biases and normalization parameters not adapted, not decayed).
        lr: learning rate, > 0. TVLARS uses no warm-up: this is the rate from the first step.
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: >= 0, folded into the update ``u = g + weight_decay * w``.
        trust_coefficient: ``eta`` > 0 of the trust ratio ``eta * ||w|| / ||u||``.
        phase: phi(t), a :class:`~lightning_tvlars.SigmoidPhase` or any callable
            ``step -> float``; ``None`` means phi == 1, i.e. plain LARS.
        norm_clip: if set (> 0), ``||w||`` and ``||u||`` are each clamped to at most this value
            before the ratio, as in the authors' code.
        foreach: ``None`` (default) and ``True`` take the multi-tensor path where torch's fused
            SGD kernel supports the device; ``False`` the per-tensor path.

    The step count t is stored in every parameter group (``group["step"]``), so it travels with
    ``state_dict()`` under every checkpointing scheme (plain, FSDP, distributed checkpoint) and
    loads with ``torch.load(..., weights_only=True)``.

    Non-finite updates: if any ``g + weight_decay * w`` holds ``inf`` or ``nan``, the whole step
    is skipped on the device (weights and momentum buffers unchanged, no host sync) and
    :attr:`last_step_stats` reports ``skipped``; t still advances, as an LR scheduler does when a
    ``GradScaler`` skips a step.

    Example:
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

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        phase: SigmoidPhase | Callable[[int], float] | None = None,
        norm_clip: float | None = None,
        foreach: bool | None = None,
    ) -> None:
        if phase is not None and not callable(phase):
            raise TypeError(
                f"phase={phase!r} is invalid: expected a SigmoidPhase, a callable "
                "step -> float, or None"
            )
        if foreach not in (None, True, False):
            raise ValueError(f"foreach={foreach!r} is invalid: expected None, True or False")
        self.phase = phase
        self.foreach = foreach
        # A dict slot, not an attribute: torch.compile replays dict mutations of the optimizer
        # but drops attribute stores on it.
        self._last: dict[str, _LastStep] = {}
        self._fsdp1_groups: ShardGroups = {}
        self._plan: tuple[tuple[int, ...], ReductionPlan] | None = None
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "norm_clip": norm_clip,
            "adapt": True,
        }
        super().__init__(params, defaults)

    @classmethod
    def reference(
        cls, params: nn.Module | Iterable[Tensor], lr: float, decay: float, **overrides: Any
    ) -> TVLARS:
        """The authors' configuration (KhoiDOO/tvlars, ``opt/tvlars.py``).

        ``phi = 1 / (0.1 + exp(decay * (t + 1)))``, both norms clamped to 10, ``eta = 1e-3``,
        momentum 0.9, weight decay 5e-4, biases and normalization parameters neither adapted nor
        decayed. Given a module, groups come from :func:`param_groups`; given tensors, from their
        ``ndim`` as in the authors' code. ``overrides`` replace any constructor argument.
        """
        if isinstance(params, nn.Module):
            groups = param_groups(params, weight_decay=_REFERENCE_WEIGHT_DECAY)
        else:
            groups = split_by_ndim(params, _REFERENCE_WEIGHT_DECAY)
        kwargs: dict[str, Any] = {
            "momentum": 0.9,
            "weight_decay": _REFERENCE_WEIGHT_DECAY,
            "trust_coefficient": 1e-3,
            "phase": SigmoidPhase.reference(decay),
            "norm_clip": _REFERENCE_NORM_CLIP,
            **overrides,
        }
        return cls(groups, lr=lr, **kwargs)

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = sorted(set(param_group) - set(GROUP_HYPERPARAMETERS) - set(GROUP_METADATA))
        if unknown:
            raise ValueError(
                f"parameter group keys {unknown} are invalid: expected some of "
                f"{list(GROUP_HYPERPARAMETERS + GROUP_METADATA)}"
            )
        step = self.param_groups[0]["step"] if self.param_groups else 0
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_positive("lr", group["lr"])
        check_unit_interval("momentum", group["momentum"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive("trust_coefficient", group["trust_coefficient"])
        if group["norm_clip"] is not None:
            check_positive("norm_clip", group["norm_clip"])
        if not isinstance(group["adapt"], bool):
            raise TypeError(f"adapt={group['adapt']!r} is invalid: expected True or False")
        for p in group["params"]:
            if is_flat_parameter(p):
                raise ValueError(
                    "FSDP1 FlatParameters are not supported: each one concatenates several "
                    "layers, so layer-wise norms do not exist; wrap with use_orig_params=True "
                    "(Lightning's default) or use FSDP2 (fully_shard / ModelParallelStrategy)"
                )
            if p.is_sparse or p.is_complex():
                raise TypeError(
                    f"TVLARS supports dense real tensors, got a tensor of layout "
                    f"{p.layout} and dtype {p.dtype}"
                )
        group["step"] = step  # one counter shared by all groups, see step_count

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("step", 0)
        self.__dict__.setdefault("_last", {})
        self.__dict__.setdefault("_fsdp1_groups", {})
        self.__dict__.setdefault("_plan", None)

    # ------------------------------------------------------------------ sharding

    def attach_fsdp(self, model: nn.Module) -> None:
        """Register the shard process groups of an FSDP1 model (``use_orig_params=True``).

        Call it once after wrapping; ``configure_tvlars`` does it under Lightning's
        ``FSDPStrategy``. FSDP2 (DTensor) and DDP need nothing.
        """
        self._fsdp1_groups = fsdp1_shard_groups(model)
        self._plan = None

    def _reduction_plan(self, params: list[Tensor]) -> ReductionPlan:
        key = tuple(id(p) for p in params)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, ReductionPlan.build(params, self._fsdp1_groups))
        return self._plan[1]

    def full_norms(self, params: list[Tensor], tensors: list[Tensor]) -> Tensor:
        """Norms of full tensors given per-parameter tensors (e.g. gradients) of ``params``.

        ``tensors[i]`` has the layout of ``params[i]`` (DTensor or local piece); the result is
        exact under sharding, at the cost of at most one collective per process group.
        """
        local = local_norms([local_tensor(t) for t in tensors], foreach=True)
        return self._reduction_plan(params).reduce(local)

    @property
    def step_count(self) -> int:
        """t: the number of optimizer steps taken so far (0 before the first step)."""
        return int(self.param_groups[0]["step"])

    @property
    def last_step_stats(self) -> TVLARSStepStats | None:
        """Statistics of the last step (``None`` before the first), still on the device.

        Built on access (one ``cat`` for the trust ratios), so steps that nobody logs pay nothing.
        """
        last = self._last.get("step")
        return None if last is None else last.stats()

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one TVLARS step; ``closure`` (re-evaluating the loss) runs with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        views = [view for group in self.param_groups if (view := self._view(group)).params]
        if not views:
            return loss
        t = self.step_count
        foreach = self._use_foreach(views)
        phi = self._phase_value(t, views[0].weights[0].device)

        updates = [self._updates_foreach(view) for view in views] if foreach else None
        local = self._local_norms(views, updates)
        plan = self._reduction_plan([p for view in views for p in view.params])
        weight_norm, update_norm = plan.reduce(local).split(len(plan.counts))
        skipped = update_norm.isfinite().all().logical_not()
        found_inf = skipped.to(torch.float32)  # the fused kernel's form of the same flag

        ratios: list[Tensor | None] = []
        start = 0
        for index, view in enumerate(views):
            end = start + len(view.params)
            group = view.group
            ratio = scale = None
            if group["adapt"]:
                ratio = trust_ratio(
                    weight_norm[start:end],
                    update_norm[start:end],
                    group["trust_coefficient"],
                    group["norm_clip"],
                )
                scale = ratio if isinstance(phi, float) and phi == 1.0 else ratio * phi
            if updates is not None:
                self._apply_foreach(view, updates[index], scale, found_inf)
            else:
                self._apply_single(view, scale, skipped, found_inf)
            ratios.append(ratio)
            start = end

        self._last["step"] = _LastStep(
            t,
            phi,
            [(v.params, v.names, v.group["adapt"], float(v.group["lr"])) for v in views],
            weight_norm,
            update_norm,
            ratios,
            skipped,
        )
        for group in self.param_groups:
            group["step"] = t + 1
        return loss

    def _view(self, group: dict[str, Any]) -> _GroupView:
        names = group.get("param_names")
        view = _GroupView(group, [], [], [], [], [])
        present = [p for p in group["params"] if p.grad is not None]
        local_grads = iter(local_gradients(present, [p.grad for p in present]))
        for i, p in enumerate(group["params"]):
            weight = local_tensor(p)
            if p.grad is not None:
                grad = next(local_grads)
            elif id(p) in self._fsdp1_groups:
                # FSDP1 leaves grad None where this rank's shard of p is empty: keep the list
                # identical on all ranks so that the norm reduction matches everywhere.
                grad = torch.zeros_like(weight)
            else:
                continue
            if grad.is_sparse:
                raise TypeError("TVLARS does not support sparse gradients")
            view.params.append(p)
            view.names.append(names[i] if names else None)
            view.weights.append(weight)
            view.grads.append(grad)
            if group["momentum"] != 0:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                view.buffers.append(local_tensor(state["momentum_buffer"]))
        return view

    def _phase_value(self, t: int, device: torch.device) -> float | Tensor:
        """phi(t): a host float in eager mode; a tensor op while ``torch.compile`` traces."""
        if self.phase is None:
            return 1.0
        if torch.compiler.is_compiling() and isinstance(self.phase, SigmoidPhase):
            return self.phase.tensor(torch.scalar_tensor(t, device=device))
        return float(self.phase(t))

    def _use_foreach(self, views: list[_GroupView]) -> bool:
        if self.foreach is False or torch.compiler.is_compiling():
            # Under torch.compile, Inductor fuses the per-tensor ops of the reference path;
            # torch's fused SGD kernel has no fake implementation and cannot be traced.
            return False
        ok = fused_kernel_supports([w for view in views for w in view.weights])
        if self.foreach and not ok:
            raise ValueError(
                "foreach=True is invalid here: the multi-tensor path needs devices in "
                f"{sorted(_get_fused_kernels_supported_devices())}"
            )
        return ok

    @staticmethod
    def _update(weight: Tensor, grad: Tensor, decay: float) -> Tensor:
        """``u = g + weight_decay * w`` for one tensor (``g`` itself without decay)."""
        return grad if decay == 0 else grad.add(weight, alpha=decay)

    @staticmethod
    def _updates_foreach(view: _GroupView) -> list[Tensor]:
        """``u = g + weight_decay * w`` for a whole group in one multi-tensor operation."""
        decay = view.group["weight_decay"]
        if decay == 0:
            return view.grads
        return list(torch._foreach_add(view.grads, view.weights, alpha=decay))

    def _local_norms(self, views: list[_GroupView], updates: list[list[Tensor]] | None) -> Tensor:
        """``[||w_1||, .., ||w_n||, ||u_1||, .., ||u_n||]`` of the local tensors.

        Multi-tensor path: one ``_foreach_norm`` over the updates formed for the whole step.
        Per-tensor path: each ``u`` is formed, measured while in cache and freed (it is formed
        again in the update), so no gradient-sized temporary outlives one tensor.
        """
        weights = [w for view in views for w in view.weights]
        if updates is not None:
            return local_norms([*weights, *(u for us in updates for u in us)], foreach=True)
        dtype = accumulation_dtype(weights)
        norms = [torch.linalg.vector_norm(w, dtype=dtype) for w in weights]
        for view in views:
            decay = view.group["weight_decay"]
            norms += [
                torch.linalg.vector_norm(self._update(w, g, decay), dtype=dtype)
                for w, g in zip(view.weights, view.grads, strict=True)
            ]
        return torch.stack(norms)

    @staticmethod
    def _fused_momentum_step(
        weights: list[Tensor],
        updates: list[Tensor],
        buffers: list[Tensor],
        group: dict[str, Any],
        found_inf: Tensor,
    ) -> None:
        """``b = m b + u; w -= lr b`` in torch's fused SGD kernel, a no-op if ``found_inf``."""
        torch._fused_sgd_(
            weights,
            updates,
            buffers,
            weight_decay=0.0,
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,  # buffers start at zero: m * 0 + u == u
            grad_scale=None,
            found_inf=found_inf,
        )

    @staticmethod
    def _apply_foreach(
        view: _GroupView, updates: list[Tensor], scale: Tensor | None, found_inf: Tensor
    ) -> None:
        """``b = m b + scale * u; w -= lr b`` with one foreach scale and torch's fused SGD."""
        if scale is not None:
            factors = scale.unbind()
            if updates is view.grads:  # never scale the user's gradients in place
                updates = list(torch._foreach_mul(updates, factors))
            else:
                torch._foreach_mul_(updates, factors)
        group = view.group
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, w in enumerate(view.weights):
            buckets[(w.device, w.dtype)].append(i)
        for index in buckets.values():
            TVLARS._fused_momentum_step(
                [view.weights[i] for i in index],
                [updates[i] for i in index],
                [view.buffers[i] for i in index] if view.buffers else [],
                group,
                found_inf,
            )

    @staticmethod
    def _apply_single(
        view: _GroupView, scale: Tensor | None, skipped: Tensor, found_inf: Tensor
    ) -> None:
        """The same update one tensor at a time, forming ``u`` again while it is in cache.

        Eagerly each tensor goes through torch's fused SGD kernel (skipped on the device when
        ``skipped``); while ``torch.compile`` traces, plain ops with ``torch.where``, which
        Inductor fuses.
        """
        group = view.group
        momentum, lr, decay = group["momentum"], group["lr"], group["weight_decay"]
        fused = not torch.compiler.is_compiling() and fused_kernel_supports(view.weights)
        for i, (w, g) in enumerate(zip(view.weights, view.grads, strict=True)):
            u = TVLARS._update(w, g, decay)
            if scale is not None:
                u = u * scale[i] if u is g else u.mul_(scale[i])
            if fused:
                buffers = [view.buffers[i]] if momentum != 0 else []
                TVLARS._fused_momentum_step([w], [u], buffers, group, found_inf)
                continue
            if momentum != 0:
                buf = view.buffers[i]
                buf.copy_(torch.where(skipped, buf, buf * momentum + u))
                u = buf
            w.copy_(torch.where(skipped, w, w - lr * u))
