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

import types
import warnings
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
from lightning_tvlars.optim.workspace import LayoutCache, capturing
from lightning_tvlars.phase import SigmoidPhase

#: phi(t): a SigmoidPhase or any callable step -> float; None is phi == 1.
Phase = SigmoidPhase | Callable[[int], float] | None
#: A learning rate: a float, or a 0-d tensor that schedulers write in place.
LR = float | Tensor


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
        "fused": None,
        "amsgrad": False,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        phase: Phase,
        capturable: bool = False,
        compiled: bool = False,
    ) -> None:
        if phase is not None and not callable(phase):
            raise TypeError(
                f"phase={phase!r} is invalid: expected a SigmoidPhase, a callable "
                "step -> float, or None"
            )
        for name, value in (("capturable", capturable), ("compiled", compiled)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} is invalid: expected True or False")
        if (capturable or compiled) and phase is not None and not hasattr(phase, "tensor"):
            raise TypeError(_host_phase_message(phase))
        self.phase = phase
        #: t, the learning rates and phi(t) live on the device (see the subclasses' docstrings).
        self.capturable = capturable or compiled
        #: the update runs compiled by ``torch.compile(fullgraph=True)``, the closure eagerly.
        self.compiled = compiled
        self._compiled_update: Callable[[], None] | None = None
        self._layouts = LayoutCache()
        # Dict slots, not attributes: torch.compile replays dict mutations of the optimizer
        # but drops attribute stores on it. The slot exists from the start: a compiled step
        # guards on the dict's keys, which must not change from the first step to the next.
        self._last: dict[str, tuple[int, float | Tensor, dict[int, str], StepResult] | None]
        self._last = {"step": None}
        self._plans: dict[tuple[int, ...], ReductionPlan] = {}
        self._fsdp1_groups: ShardGroups = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        step = self.param_groups[0]["step"] if self.param_groups else None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, neutral in self.REFUSED.items():
            if group.get(key, neutral) not in (neutral, False, None, 0):
                raise ValueError(
                    f"{key}={group[key]!r} is not supported by {type(self).__name__}: remove it "
                    f"(it implements {', '.join(self.OPTIONS)})"
                )
        if group.get("capturable", self.capturable) != self.capturable:
            raise ValueError(
                f"capturable={group['capturable']!r} in a group is invalid: it is one choice "
                f"for the whole optimizer (one step count t for all groups); set it on "
                f"{type(self).__name__}(..., capturable=...)"
            )
        group["lr"] = self._checked_lr(group)
        self._check_group(group)
        if group["foreach"] is not None and not isinstance(group["foreach"], bool):
            raise ValueError(
                f"foreach={group['foreach']!r} is invalid: expected None, True or False"
            )
        for p in group["params"]:
            if self.compiled and _is_shard(p):
                raise ValueError(
                    "compiled=True is not supported with sharded parameters (DTensor, FSDP): "
                    "the norms' collectives are not compiled; use "
                    f"{type(self).__name__}(..., compiled=False), the eager step, which is exact "
                    "under sharding"
                )
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
        # One counter shared by all groups (the same object), see step_count.
        group["step"] = self._clock_value(0 if step is None else step)
        for other in self.param_groups:
            other["step"] = group["step"]

    def _checked_lr(self, group: dict[str, Any]) -> LR:
        """The group's ``lr``: a float > 0, or a 0-d floating-point tensor holding one (read
        once, here). With ``capturable`` a float becomes a tensor on the parameters' device."""
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            check_positive("lr", lr)
            if not self.capturable:
                return lr
            dtype = accumulation_dtype([local_tensor(p) for p in group["params"]])
            device = _device_of(group["params"])
            return _static(torch.tensor(float(lr), dtype=dtype, device=device))
        if lr.ndim != 0 or not lr.is_floating_point() or lr.requires_grad:
            raise ValueError(
                f"lr={lr!r} is invalid: expected a float > 0 or a 0-d floating-point tensor "
                "without grad"
            )
        check_positive("lr", float(lr))
        device = _device_of(group["params"])
        if self.capturable and lr.device != device:
            raise ValueError(
                f"lr on {lr.device} is invalid with capturable=True or compiled=True: "
                f"expected a tensor on the parameters' device {device} (a CUDA graph reads it "
                "there), or a float"
            )
        return _static(lr) if self.capturable else lr

    def _clock_value(self, step: int | Tensor) -> int | Tensor:
        """t as this optimizer keeps it: an int, or with ``capturable`` an int64 0-d tensor on
        the first parameter's device (read on the host once here when it comes as a tensor
        from a state dict, never in ``step()``)."""
        if not self.capturable:
            return int(step)
        device = _device_of([p for group in self.param_groups for p in group["params"]])
        if isinstance(step, Tensor) and step.dtype == torch.int64 and step.device == device:
            return _static(step)
        return _static(torch.as_tensor(step).to(device, torch.int64))

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate the subclass's options of a new group (raise naming the option)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ copies and state

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; the phase is needed to step too.
        # Workspaces, reduction plans and FSDP1 process groups are not copied: a copy builds
        # its own (and an FSDP1 copy must be attached to its model again).
        return {
            **super().__getstate__(),
            "phase": self.phase,
            "capturable": self.capturable,
            "compiled": self.compiled,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling and copying build a new object; load_state_dict calls this on the live
        # one, whose FSDP1 registration stays (its model is the same).
        super().__setstate__(state)
        self.__dict__.setdefault("phase", None)
        self.__dict__.setdefault("capturable", False)
        self.__dict__.setdefault("compiled", False)
        self._compiled_update = None  # a copy compiles its own update
        self.__dict__.setdefault("_fsdp1_groups", {})
        self._layouts = LayoutCache()
        self._last = {"step": None}
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("foreach", None)
            for key in self.OPTIONS:  # checkpoints written before an option existed
                group.setdefault(key, self.defaults[key])
            if self.capturable:  # a float rate of an eager run's checkpoint: on the device
                lr = group["lr"]
                if isinstance(lr, Tensor):  # where a checkpoint's map_location put it
                    group["lr"] = lr.to(_device_of(group["params"]))
                group["lr"] = self._checked_lr(group)
        if self.param_groups:  # one shared counter, kept as this optimizer keeps it
            step = self._clock_value(self.param_groups[0].get("step", 0))
            for group in self.param_groups:
                group["step"] = step

    @property
    def _step_supports_amp_scaling(self) -> bool:  # read by torch.amp.GradScaler
        """Unscale inside the step, unless parameters are sharded (DTensor, FSDP1 views).

        ``ShardedGradScaler`` all-reduces ``found_inf`` across ranks only in ``unscale_``, which
        it skips for optimizers that unscale themselves: their ranks would keep different
        scales. For sharded parameters the scaler unscales (one host sync per step, where it
        checks ``found_inf``).
        """
        return not self._sharded()

    def _sharded(self) -> bool:
        """Whether any parameter is a shard (DTensor, an FSDP1 view)."""
        return any(_is_shard(p) for group in self.param_groups for p in group["params"])

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
        if torch.compiler.is_compiling():
            # Traced once per compilation: a cache filled while tracing would fail the guards
            # of the next call (one recompilation).
            return ReductionPlan.build(params, self._fsdp1_groups).reduce(local)
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
        """t: the number of optimizer steps taken so far (0 before the first step).

        With ``capturable=True`` t lives on the device and reading it here is a device-to-host
        copy (a sync on CUDA); the step itself never reads it.
        """
        return int(self.param_groups[0]["step"])

    @property
    def last_step_stats(self) -> StepStats | None:
        """Statistics of the last step (``None`` before the first), still on the device.

        Built on access (one ``cat`` for the trust ratios), so steps nobody logs pay nothing.
        """
        last = self._last["step"]
        if last is None:
            return None
        t, phase, names, result = last
        clock = self.param_groups[0]["step"]
        # capturable: t stays on the device (where it has advanced by one since)
        step: int | Tensor = clock - 1 if isinstance(clock, Tensor) else t
        return result.stats(step, phase, names)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) runs eagerly with grad enabled.

        With ``compiled=True`` the update (everything after the closure) runs as compiled by
        ``torch.compile(fullgraph=True)`` on the first call: once for the whole run, since t,
        the rates and phi(t) are device tensors."""
        loss = self._evaluate(closure)
        if not self.compiled or torch.compiler.is_compiling():
            self._update()
            return loss
        for group in self.param_groups:  # refused here: raised while tracing, Dynamo's error
            for p in group["params"]:
                self._refuse_sparse(p.grad)
        if self._compiled_update is None:
            self._compiled_update = self._compile_update()
        try:
            self._compiled_update()
        except torch._dynamo.exc.FailOnRecompileLimitHit:  # raised before anything ran
            warnings.warn(
                f"{type(self).__name__}(compiled=True): the update reached torch's recompile "
                f"limit ({torch._dynamo.config.recompile_limit} compilations), each one made "
                "because something it reads had changed (a float written into a group's lr, "
                "weight_decay, momentum or betas, a new phase, which parameters have "
                "gradients); compiling afresh. Each compilation takes seconds: keep those "
                "fixed between steps (schedulers write tensor rates in place)",
                stacklevel=4,  # the caller of optimizer.step (past torch's two wrappers)
            )
            self._compiled_update = self._compile_update()
            self._compiled_update()
        return loss

    def _compile_update(self) -> Callable[[], None]:
        """The update compiled with a code object of this optimizer's own (see
        :func:`_own_code`)."""
        return torch.compile(_own_code(self._update), fullgraph=True)

    def _refuse_sparse(self, grad: Tensor | None) -> None:
        if grad is not None and grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients")

    def _update(self) -> None:
        """Update every parameter with a gradient (the subclass's functional update)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ a step's bookkeeping

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        """Create ``p``'s state if it has none (the subclass's state)."""
        raise NotImplementedError

    def _init_group(self) -> None:
        """Create the missing state of every parameter that steps. torch's name for it:
        ``torch.compile`` runs it eagerly before it traces a step (one call for all groups, so
        that the traced step sees all the state), and a compiled step finds its state from the
        first call on (it does not compile again once the state exists)."""
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if (grad is not None and not grad.is_sparse) or id(p) in self._fsdp1_groups:
                    self._init_state(p, group)

    def _gather(self) -> list[GroupTensors]:
        """Every group's parameters with a gradient, their local weights and gradients (brought
        to the parameters' layout, unscaled under GradScaler), with their state created. One
        entry per group, empty groups included."""
        self._init_group()
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
                self._refuse_sparse(grad)
                tensors.params.append(p)
                tensors.weights.append(local_tensor(p))
                tensors.grads.append(grad)
            gathered.append(tensors)
        params = [p for t in gathered for p in t.params]
        local = iter(local_gradients(params, [g for t in gathered for g in t.grads]))
        for tensors in gathered:
            tensors.grads[:] = [next(local) for _ in tensors.grads]
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)  # set by GradScaler
        if (grad_scale is not None or self._found_inf() is not None) and capturing():
            raise ValueError(
                "a GradScaler step is invalid inside a CUDA graph capture: the scaler checks "
                "the gradients and updates its scale outside the optimizer, on tensors it "
                "creates anew every step, which a replayed graph would not read. Capture the "
                "step without GradScaler (bfloat16 autocast needs none), or do not capture it"
            )
        if grad_scale is not None:
            _unscale_([g for t in gathered for g in t.grads], grad_scale)
        return gathered

    def _found_inf(self) -> Tensor | None:
        """GradScaler's verdict on the scaled gradients (set when it calls the step)."""
        return getattr(self, "found_inf", None)

    def _phase_value(self, device: torch.device) -> float | Tensor:
        """phi(t): a host float in eager mode; a tensor op on the device with ``capturable``
        (from the device's t) and while ``torch.compile`` traces."""
        if self.phase is None:
            return 1.0
        t = self.param_groups[0]["step"]
        evaluate = getattr(self.phase, "tensor", None)
        if isinstance(t, Tensor):
            if evaluate is None:  # a phase set after construction
                raise TypeError(_host_phase_message(self.phase))
            return evaluate(t)
        if evaluate is not None and torch.compiler.is_compiling():
            return evaluate(torch.scalar_tensor(t, device=device))
        return float(self.phase(t))

    def _finish(self, phase: float | Tensor, result: StepResult) -> None:
        """Keep the step's results for :attr:`last_step_stats` and advance t (on the device
        with ``capturable``: the one counter all groups hold)."""
        names = {
            id(p): name
            for group in self.param_groups
            for p, name in zip(group["params"], group.get("param_names") or (), strict=False)
        }
        t = self.param_groups[0]["step"]
        if isinstance(t, Tensor):
            self._last["step"] = (-1, phase, names, result)
            t.add_(1)
            return
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


def _is_shard(p: Tensor) -> bool:
    """Whether ``p`` is a shard of a parameter (a DTensor, an FSDP1 view)."""
    return is_dtensor(p) or getattr(p, "_fsdp_flattened", False)


def _host_phase_message(phase: object) -> str:
    return (
        f"phase={phase!r} is invalid with capturable=True or compiled=True: expected a phase "
        "evaluated on the device (SigmoidPhase, or an object with a tensor(step) -> Tensor "
        "method); a callable step -> float needs t on the host"
    )


def _own_code(method: Callable[[], None]) -> Callable[[], None]:
    """``method`` bound to the same object, its function's code object a copy of its own.

    Dynamo keeps compiled graphs on the code object, guarded on ``self``: with the class's
    code, every optimizer in a process would add a compilation to one cache, and past torch's
    recompile limit the next would fail under ``fullgraph=True``.
    """
    function = method.__func__  # type: ignore[attr-defined]
    clone = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    clone.__qualname__ = function.__qualname__
    return types.MethodType(clone, method.__self__)  # type: ignore[attr-defined]


def _static(t: Tensor) -> Tensor:
    """Mark a tensor the step reads (and t, which it advances) as staying where it is, so that
    ``torch.compile(mode="reduce-overhead")`` reads it in place instead of copying it into its
    CUDA graph every step (and does not refuse to graph a step that advances t)."""
    torch._dynamo.mark_static_address(t)
    return t


def _device_of(params: Sequence[Tensor]) -> torch.device:
    """Where a group's step tensors live: its first parameter's (local) device; CPU if none."""
    return local_tensor(params[0]).device if params else torch.device("cpu")


def _unscale_(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide gradients in place by GradScaler's scale, one multi-tensor call per device/dtype."""
    inverse = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
    optional: list[Tensor | None] = list(grads)  # the type torch's grouping takes
    grouped = Optimizer._group_tensors_by_device_and_dtype([optional])
    for (device, _), ((tensors,), _) in grouped.items():
        torch._foreach_mul_([t for t in tensors if t is not None], inverse.to(device))
