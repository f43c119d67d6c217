"""What every optimizer of the trust-ratio family does around its update rule.

:class:`LayerwiseOptimizer` holds the phase, the step clock ``t``, the checks every group
gets, and the bookkeeping of a step: gathering the local tensors of every parameter with a
gradient (DTensor shards, FSDP1 views), bringing tensor-parallel gradients to their
parameter's layout, unscaling under ``torch.amp.GradScaler``, the norm reduction under
sharding, and the statistics of the last step. Subclasses (:class:`~lightning_tvlars.TVLARS`,
:class:`~lightning_tvlars.LAMB`) declare their options, build their state and call their
functional update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_tvlars._validation import check_positive
from lightning_tvlars.optim.norms import (
    ReductionPlan,
    ShardGroups,
    fsdp1_shard_groups,
    is_dtensor,
    is_flat_parameter,
    local_gradients,
    local_tensor,
)
from lightning_tvlars.optim.trust import StepResult, StepStats, accumulation_dtype, tensor_norms
from lightning_tvlars.optim.workspace import LayoutCache
from lightning_tvlars.phase import SigmoidPhase

#: phi(t): a SigmoidPhase or any callable step -> float; None is phi == 1.
Phase = SigmoidPhase | Callable[[int], float] | None


class GroupTensors(NamedTuple):
    """The tensors of one group that a step updates: every parameter with a gradient."""

    params: list[Tensor]  # as held: maybe DTensor or FSDP1 views
    weights: list[Tensor]  # their local tensors, which the update reads and writes
    grads: list[Tensor]  # local, laid out like the weights, unscaled


class LayerwiseOptimizer(Optimizer):
    """Shared machinery of the family (see the module docstring).

    Subclasses set :attr:`OPTIONS` (the group keys they implement, each validated by
    :meth:`_check_group`) and :attr:`REFUSED` (torch.optim options they do not implement,
    with their neutral value: a group that sets one otherwise is refused, never silently
    ignored). Any other group key is carried along untouched (``param_names``, timm's
    ``lr_scale``, ...), as torch's own optimizers do.
    """

    OPTIONS: ClassVar[tuple[str, ...]] = ()
    REFUSED: ClassVar[dict[str, object]] = {
        "dampening": 0,
        "differentiable": False,
        "capturable": False,
        "fused": None,
        "amsgrad": False,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        phase: Phase,
    ) -> None:
        if phase is not None and not callable(phase):
            raise TypeError(
                f"phase={phase!r} is invalid: expected a SigmoidPhase, a callable "
                "step -> float, or None"
            )
        self.phase = phase
        self._layouts = LayoutCache()
        # Dict slots, not attributes: torch.compile replays dict mutations of the optimizer
        # but drops attribute stores on it.
        self._last: dict[str, tuple[int, float | Tensor, dict[int, str], StepResult]] = {}
        self._plans: dict[tuple[int, ...], ReductionPlan] = {}
        self._fsdp1_groups: ShardGroups = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        step = self.param_groups[0]["step"] if self.param_groups else 0
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, neutral in self.REFUSED.items():
            if group.get(key, neutral) not in (neutral, False, None, 0):
                raise ValueError(
                    f"{key}={group[key]!r} is not supported by {type(self).__name__}: remove it "
                    f"(it implements {', '.join(self.OPTIONS)})"
                )
        if isinstance(group["lr"], Tensor):
            raise ValueError(
                f"lr={group['lr']!r} is invalid: a Tensor lr is not supported by "
                f"{type(self).__name__}; expected a float > 0"
            )
        check_positive("lr", group["lr"])
        self._check_group(group)
        if group["foreach"] is not None and not isinstance(group["foreach"], bool):
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
                    f"{type(self).__name__} supports dense real tensors, got a tensor of layout "
                    f"{p.layout} and dtype {p.dtype}"
                )
        group["step"] = step  # one counter shared by all groups, see step_count

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate the subclass's options of a new group (raise naming the option)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ copies and state

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; the phase is needed to step too.
        # Workspaces, reduction plans and FSDP1 process groups are not copied: a copy builds
        # its own (and an FSDP1 copy must be attached to its model again).
        return {**super().__getstate__(), "phase": self.phase}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling and copying build a new object; load_state_dict calls this on the live
        # one, whose FSDP1 registration stays (its model is the same).
        super().__setstate__(state)
        self.__dict__.setdefault("phase", None)
        self.__dict__.setdefault("_fsdp1_groups", {})
        self._layouts = LayoutCache()
        self._last = {}
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("step", 0)
            group.setdefault("foreach", None)
            for key in self.OPTIONS:  # checkpoints written before an option existed
                group.setdefault(key, self.defaults[key])

    @property
    def _step_supports_amp_scaling(self) -> bool:  # read by torch.amp.GradScaler
        """Unscale inside the step, unless parameters are sharded (DTensor, FSDP1 views).

        ``ShardedGradScaler`` all-reduces ``found_inf`` across ranks only in ``unscale_``, which
        it skips for optimizers that unscale themselves: their ranks would keep different
        scales. For sharded parameters the scaler unscales (one host sync per step, where it
        checks ``found_inf``).
        """
        return not any(
            is_dtensor(p) or getattr(p, "_fsdp_flattened", False)
            for group in self.param_groups
            for p in group["params"]
        )

    # ------------------------------------------------------------------ sharding

    def attach_fsdp(self, model: nn.Module) -> None:
        """Register the shard process groups of an FSDP1 model (``use_orig_params=True``).

        Call it once after wrapping; ``configure_tvlars`` does it under Lightning's
        ``FSDPStrategy``. FSDP2 (DTensor) and DDP need nothing.
        """
        self._fsdp1_groups = fsdp1_shard_groups(model)
        self._plans.clear()

    def reduce_norms(self, params: Sequence[Tensor], local: Tensor) -> Tensor:
        """Full-tensor norms from the local ones of ``params`` (``local`` may stack several
        lists of ``len(params)`` norms): at most one collective per process group."""
        key = tuple(map(id, params))
        if key not in self._plans:
            self._plans.clear()  # one parameter set at a time: no growth
            self._plans[key] = ReductionPlan.build(params, self._fsdp1_groups)
        return self._plans[key].reduce(local)

    def full_norms(self, params: list[Tensor], tensors: list[Tensor]) -> Tensor:
        """Norms of full tensors given per-parameter tensors (e.g. gradients) of ``params``.

        ``tensors[i]`` has the layout of ``params[i]`` (DTensor or local piece); the result is
        exact under sharding, at the cost of at most one collective per process group.
        """
        local = local_gradients(params, tensors)
        device = local_tensor(params[0]).device
        return self.reduce_norms(params, tensor_norms(local, accumulation_dtype(local), device))

    # ------------------------------------------------------------------ the clock and stats

    @property
    def step_count(self) -> int:
        """t: the number of optimizer steps taken so far (0 before the first step)."""
        return int(self.param_groups[0]["step"])

    @property
    def last_step_stats(self) -> StepStats | None:
        """Statistics of the last step (``None`` before the first), still on the device.

        Built on access (one ``cat`` for the trust ratios), so steps nobody logs pay nothing.
        """
        last = self._last.get("step")
        if last is None:
            return None
        step, phase, names, result = last
        return result.stats(step, phase, names)

    # ------------------------------------------------------------------ a step's bookkeeping

    def _gather(self, state: Callable[[Tensor, dict[str, Any]], None]) -> list[GroupTensors]:
        """Every group's parameters with a gradient, their local weights and gradients (brought
        to the parameters' layout, unscaled under GradScaler); ``state(p, group)`` creates
        missing state. One entry per group, empty groups included."""
        gathered = []
        for group in self.param_groups:
            tensors = GroupTensors([], [], [])
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    if id(p) not in self._fsdp1_groups:
                        continue
                    # FSDP1 leaves grad None where this rank's shard of p is empty: keep the
                    # list identical on all ranks so that the norm reduction matches everywhere.
                    grad = torch.zeros_like(local_tensor(p))
                if grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                state(p, group)
                tensors.params.append(p)
                tensors.weights.append(local_tensor(p))
                tensors.grads.append(grad)
            gathered.append(tensors)
        params = [p for t in gathered for p in t.params]
        local = iter(local_gradients(params, [g for t in gathered for g in t.grads]))
        for tensors in gathered:
            tensors.grads[:] = [next(local) for _ in tensors.grads]
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)  # set by GradScaler
        if grad_scale is not None:
            _unscale_([g for t in gathered for g in t.grads], grad_scale)
        return gathered

    def _found_inf(self) -> Tensor | None:
        """GradScaler's verdict on the scaled gradients (set when it calls the step)."""
        return getattr(self, "found_inf", None)

    def _phase_value(self, device: torch.device) -> float | Tensor:
        """phi(t): a host float in eager mode; a tensor op while ``torch.compile`` traces."""
        if self.phase is None:
            return 1.0
        t = self.step_count
        if torch.compiler.is_compiling() and hasattr(self.phase, "tensor"):
            return self.phase.tensor(torch.scalar_tensor(t, device=device))
        return float(self.phase(t))

    def _finish(self, phase: float | Tensor, result: StepResult) -> None:
        """Keep the step's results for :attr:`last_step_stats` and advance t."""
        names = {
            id(p): name
            for group in self.param_groups
            for p, name in zip(group["params"], group.get("param_names") or (), strict=False)
        }
        t = self.step_count
        self._last["step"] = (t, phase, names, result)
        for group in self.param_groups:
            group["step"] = t + 1

    @staticmethod
    def _evaluate(closure: Callable[[], Any] | None) -> Any:
        """The closure's loss, computed with gradients enabled (``None`` without one)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def _unscale_(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide gradients in place by GradScaler's scale, one multi-tensor call per device/dtype."""
    inverse = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
    grouped = Optimizer._group_tensors_by_device_and_dtype([list[Tensor | None](grads)])
    for (device, _), ((tensors,), _) in grouped.items():
        torch._foreach_mul_([t for t in tensors if t is not None], inverse.to(device))
