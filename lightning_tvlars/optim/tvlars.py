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

This class holds the hyper-parameters, the state and the bookkeeping of a step (gathering the
local tensors, mixed-precision unscaling, the one norm reduction under sharding, the skip
decision, statistics); the arithmetic lives in :mod:`lightning_tvlars.optim.update`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_tvlars._validation import (
    check_non_negative,
    check_positive,
    check_unit_interval,
)
from lightning_tvlars.optim.groups import param_groups, split_by_ndim
from lightning_tvlars.optim.norms import (
    ReductionPlan,
    ShardGroups,
    fsdp1_shard_groups,
    is_dtensor,
    is_flat_parameter,
    local_gradients,
    local_norms,
    local_tensor,
)
from lightning_tvlars.optim.stats import GroupRecord, StepRecord, TVLARSStepStats
from lightning_tvlars.optim.update import (
    GroupPlans,
    GroupTensors,
    MultiTensorUpdate,
    PlainUpdate,
    StepFlags,
    by_device_and_dtype,
)
from lightning_tvlars.phase import SigmoidPhase

#: Hyper-parameters a group may set; any other key is carried along untouched (``param_names``,
#: ``name``, timm's ``lr_scale``, ...), as torch's own optimizers do.
GROUP_HYPERPARAMETERS = (
    "lr",
    "momentum",
    "weight_decay",
    "trust_coefficient",
    "norm_clip",
    "adapt",
    "foreach",
)

_REFERENCE_WEIGHT_DECAY = 5e-4
_REFERENCE_NORM_CLIP = 10.0

Update = PlainUpdate | MultiTensorUpdate


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


class TVLARS(Optimizer):
    """Time-Varying LARS: LARS whose trust ratio is multiplied by a decaying phase phi(t).

    Args:
        params: tensors, or parameter groups (dicts). Group keys: ``lr``, ``momentum``,
            ``weight_decay``, ``trust_coefficient``, ``norm_clip``, ``adapt``, ``foreach``;
            any other key (``param_names``, ``name``, timm's ``lr_scale``) is carried along.
            :func:`~lightning_tvlars.param_groups` builds the usual split (biases and
            normalization parameters not adapted, not decayed).
        lr: learning rate, a float > 0. TVLARS uses no warm-up: this is the rate from the first
            step.
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: >= 0, folded into the update ``u = g + weight_decay * w``.
        trust_coefficient: ``eta`` > 0 of the trust ratio ``eta * ||w|| / ||u||``.
        phase: phi(t), a :class:`~lightning_tvlars.SigmoidPhase` or any callable
            ``step -> float``; ``None`` means phi == 1, i.e. plain LARS.
        norm_clip: if set (> 0), ``||w||`` and ``||u||`` are each clamped to at most this value
            before the ratio, as in the authors' code.
        foreach: ``None`` (default) or ``True``: the multi-tensor path (a fixed number of
            kernels whatever the number of tensors on CUDA, cache-sized batches on CPU);
            ``True`` raises on devices without torch's fused kernels, where ``None`` takes the
            elementwise path. ``False``: the elementwise reference path. Either way, tensors
            whose layout the fused kernels cannot take (views with gaps, gradients with other
            strides than their parameter) take the elementwise path.

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

    @property
    def _step_supports_amp_scaling(self) -> bool:  # read by torch.amp.GradScaler
        """Unscale inside the step, unless parameters are sharded (DTensor, FSDP1 views).

        ``ShardedGradScaler`` all-reduces ``found_inf`` across ranks only in ``unscale_``, which
        it skips for optimizers that unscale themselves: their ranks would keep different
        scales. For sharded parameters TVLARS therefore lets the scaler unscale (one host sync
        per step, where the scaler checks ``found_inf``).
        """
        return not any(
            is_dtensor(p) or getattr(p, "_fsdp_flattened", False)
            for group in self.param_groups
            for p in group["params"]
        )

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
        self.phase = phase
        self._group_plans = GroupPlans()
        # A dict slot, not an attribute: torch.compile replays dict mutations of the optimizer
        # but drops attribute stores on it.
        self._last: dict[str, StepRecord] = {}
        self._fsdp1_groups: ShardGroups = {}
        # (parameter ids, plan), in a dict for the same reason as _last
        self._plans: dict[tuple[int, ...], ReductionPlan] = {}
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "norm_clip": norm_clip,
            "adapt": True,
            "foreach": foreach,
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

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        step = self.param_groups[0]["step"] if self.param_groups else 0
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["lr"], Tensor):
            raise ValueError(
                f"lr={group['lr']!r} is invalid: a Tensor lr is not supported by TVLARS; "
                "expected a float > 0"
            )
        check_positive("lr", group["lr"])
        check_unit_interval("momentum", group["momentum"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive("trust_coefficient", group["trust_coefficient"])
        if group["norm_clip"] is not None:
            check_positive("norm_clip", group["norm_clip"])
        if not isinstance(group["adapt"], bool):
            raise TypeError(f"adapt={group['adapt']!r} is invalid: expected True or False")
        if group["foreach"] not in (None, True, False):
            raise ValueError(
                f"foreach={group['foreach']!r} is invalid: expected None, True or False"
            )
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

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; the phase is needed to step too.
        # Scratch memory, the reduction plan and FSDP1 process groups are not copied: a copy
        # builds its own (and an FSDP1 copy must be attached to its model again).
        return {**super().__getstate__(), "phase": self.phase}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling and copying build a new object; load_state_dict calls this on the live
        # one, whose FSDP1 registration stays (its model is the same).
        super().__setstate__(state)
        self.__dict__.setdefault("phase", None)
        self.__dict__.setdefault("_fsdp1_groups", {})
        self._group_plans = GroupPlans()
        self._last = {}
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("step", 0)
            group.setdefault("foreach", None)

    # ------------------------------------------------------------------ sharding

    def attach_fsdp(self, model: nn.Module) -> None:
        """Register the shard process groups of an FSDP1 model (``use_orig_params=True``).

        Call it once after wrapping; ``configure_tvlars`` does it under Lightning's
        ``FSDPStrategy``. FSDP2 (DTensor) and DDP need nothing.
        """
        self._fsdp1_groups = fsdp1_shard_groups(model)
        self._plans.clear()

    def _reduction_plan(self, params: list[Tensor]) -> ReductionPlan:
        key = tuple(map(id, params))
        if key not in self._plans:
            self._plans.clear()  # one parameter set at a time: no growth
            self._plans[key] = ReductionPlan.build(params, self._fsdp1_groups)
        return self._plans[key]

    def full_norms(self, params: list[Tensor], tensors: list[Tensor]) -> Tensor:
        """Norms of full tensors given per-parameter tensors (e.g. gradients) of ``params``.

        ``tensors[i]`` has the layout of ``params[i]`` (DTensor or local piece); the result is
        exact under sharding, at the cost of at most one collective per process group.
        """
        local = local_norms(local_gradients(params, tensors), foreach=True)
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
        t = self.step_count
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)  # set by GradScaler
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        groups = [tensors for group in self.param_groups if (tensors := self._gather(group)).params]
        self._localize_gradients(groups)
        if not groups:
            self._finish(StepRecord.empty(t, self._phase_value(t, torch.device("cpu"))))
            return loss
        device = groups[0].weights[0].device
        phi = self._phase_value(t, device)
        if grad_scale is not None:
            _unscale_([g for tensors in groups for g in tensors.grads], grad_scale)

        updates = self._updates(groups)
        norms = [update.norms() for group_updates in updates for update in group_updates]
        ordered = [
            (tensors, [i for update in group_updates for i in update.order])
            for tensors, group_updates in zip(groups, updates, strict=True)
        ]
        params = [tensors.params[i] for tensors, order in ordered for i in order]
        local = torch.cat([w.to(device) for w, _ in norms] + [u.to(device) for _, u in norms])
        weight_norm, update_norm = self._reduction_plan(params).reduce(local).split(len(params))
        skipped = update_norm.isfinite().all().logical_not()
        if found_inf is not None:
            skipped = skipped | (found_inf.to(device) > 0)
        flags = StepFlags(skipped)

        records: list[GroupRecord] = []
        start = 0
        for (tensors, order), group_updates in zip(ordered, updates, strict=True):
            group, end = tensors.group, start + len(order)
            ratio = scale = None
            if group["adapt"]:
                ratio = trust_ratio(
                    weight_norm[start:end],
                    update_norm[start:end],
                    group["trust_coefficient"],
                    group["norm_clip"],
                )
                scale = ratio if isinstance(phi, float) and phi == 1.0 else ratio * phi
            offset = 0
            for update in group_updates:
                n = len(update.order)
                update.apply(scale[offset : offset + n] if scale is not None else None, flags)
                offset += n
            records.append(
                GroupRecord(
                    [tensors.params[i] for i in order],
                    [tensors.names[i] for i in order],
                    group["adapt"],
                    float(group["lr"]),
                    ratio,
                )
            )
            start = end
        self._finish(StepRecord(t, phi, records, weight_norm, update_norm, skipped))
        return loss

    def _finish(self, record: StepRecord) -> None:
        self._last["step"] = record
        for group in self.param_groups:
            group["step"] = record.step + 1

    @staticmethod
    def _localize_gradients(groups: list[GroupTensors]) -> None:
        """Every gradient as the local piece laid out like its parameter's (one call for the
        whole step: gradients that tensor parallelism leaves ``Partial`` are summed in one
        collective per process group)."""
        params = [p for tensors in groups for p in tensors.params]
        local = iter(local_gradients(params, [g for tensors in groups for g in tensors.grads]))
        for tensors in groups:
            tensors.grads = [next(local) for _ in tensors.grads]
            if any(g.is_sparse for g in tensors.grads):
                raise TypeError("TVLARS does not support sparse gradients")

    def _gather(self, group: dict[str, Any]) -> GroupTensors:
        """The local weight, the gradient (as held) and the momentum buffer of every parameter
        with a gradient."""
        names = group.get("param_names")
        tensors = GroupTensors(group)
        momentum = group["momentum"] != 0
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                if id(p) not in self._fsdp1_groups:
                    continue
                # FSDP1 leaves grad None where this rank's shard of p is empty: keep the list
                # identical on all ranks so that the norm reduction matches everywhere.
                grad = torch.zeros_like(local_tensor(p))
            tensors.params.append(p)
            tensors.names.append(names[i] if names else None)
            tensors.weights.append(local_tensor(p))
            tensors.grads.append(grad)
            if momentum:
                state = self.state[p]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                tensors.buffers.append(local_tensor(buffer))
        return tensors

    def _updates(self, groups: list[GroupTensors]) -> list[list[Update]]:
        """Split each group between the implementations (see :mod:`~lightning_tvlars.optim.update`).

        Multi-tensor (``foreach`` None or True) for every tensor whose layout the fused kernels
        take, one batch set per device and dtype; the elementwise path for the others, for
        ``foreach=False``, for devices without fused kernels and under ``torch.compile``. The
        split is cached per group and rebuilt when the tensors' storage or layout changes.
        """
        if torch.compiler.is_compiling():
            # Inductor fuses the elementwise path; the fused kernel has no fake implementation.
            return [[PlainUpdate(tensors)] for tensors in groups]
        multi = [tensors for tensors in groups if tensors.group["foreach"] is not False]
        plans = iter(self._group_plans.plans(multi))
        return [
            [PlainUpdate(tensors)]
            if tensors.group["foreach"] is False
            else next(plans).updates(tensors)
            for tensors in groups
        ]

    def _phase_value(self, t: int, device: torch.device) -> float | Tensor:
        """phi(t): a host float in eager mode; a tensor op while ``torch.compile`` traces."""
        if self.phase is None:
            return 1.0
        if torch.compiler.is_compiling() and hasattr(self.phase, "tensor"):
            return self.phase.tensor(torch.scalar_tensor(t, device=device))
        return float(self.phase(t))


def _unscale_(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide gradients in place by GradScaler's scale, one multi-tensor call per device/dtype."""
    inverse = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
    for (device, _), index in by_device_and_dtype(grads).items():
        torch._foreach_mul_([grads[i] for i in index], inverse.to(device))
