"""The metrics of a TVLARS step, shared by the Lightning monitor, Fabric and plain loops.

:func:`tvlars_metrics` reads what the last :meth:`~lightning_tvlars.TVLARS.step` computed and
returns plain floats, with one device-to-host copy::

    fabric.log_dict(tvlars_metrics(optimizer, scheduler=scheduler), step=step)

Names (``<prefix>`` is ``tvlars``, or ``tvlars_1``... for further optimizers; ``<name>`` the
parameter's qualified name)::

    <prefix>/phase                  phi(t) of the last step
    <prefix>/lr                     learning rate of the adapted group
    <prefix>/effective_batch_size   the batch the learning rate was scaled for (when known)
    <prefix>/skipped                1 if the last step was skipped for a non-finite update
    <prefix>/trust_ratio_{min,median,max}   over adapted tensors
    <prefix>/trust_ratio/<name>     r = eta ||w|| / ||g + beta w||          (per_layer=True)
    <prefix>/lnr/<name>             layer-wise normalized rate ||w|| / ||g||
    <prefix>/weight_norm/<name>     ||w||
    <prefix>/grad_norm/<name>       ||g||

The gradient norms are of the gradients present when the metrics are read: call it after
``step()`` and before the next ``zero_grad()``. Under gradient accumulation these are the
accumulated gradients the step used. Under sharding (FSDP, tensor parallelism) they are exact,
at the cost of one collective, so every rank must call it, not only rank zero.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_tvlars.optim import StepStats
from lightning_tvlars.optim.base import LayerwiseOptimizer

#: The whole-model metrics (``<prefix>/<name>``); every other metric is per layer.
SCALAR_METRICS: tuple[str, ...] = (
    "phase",
    "lr",
    "effective_batch_size",
    "skipped",
    "trust_ratio_min",
    "trust_ratio_median",
    "trust_ratio_max",
)
#: The per-layer families (``<prefix>/<family>/<name>``).
PER_LAYER_METRICS: tuple[str, ...] = ("trust_ratio", "lnr", "weight_norm", "grad_norm")

NameFilter = str | re.Pattern[str] | Callable[[str], bool] | None


def metric_prefix(index: int) -> str:
    """``tvlars`` for the first TVLARS optimizer, ``tvlars_<index>`` for the others."""
    return "tvlars" if index == 0 else f"tvlars_{index}"


def unwrap_optimizer(optimizer: object) -> LayerwiseOptimizer:
    """The optimizer of the family (TVLARS, LAMB) inside Lightning's ``LightningOptimizer`` or
    Fabric's ``_FabricOptimizer``."""
    inner = optimizer
    for _ in range(3):  # wrappers keep the wrapped optimizer in one of these attributes
        if isinstance(inner, LayerwiseOptimizer):
            return inner
        inner = getattr(inner, "_optimizer", None) or getattr(inner, "optimizer", None)
    raise TypeError(
        f"optimizer={type(optimizer).__name__} is invalid: expected TVLARS or LAMB (or "
        "Lightning's / Fabric's wrapper of one)"
    )


def compile_name_filter(name_filter: NameFilter) -> Callable[[str], bool] | None:
    """A predicate on parameter names from a regular expression (searched) or a callable."""
    if name_filter is None:
        return None
    if isinstance(name_filter, str):
        try:
            name_filter = re.compile(name_filter)
        except re.error as err:
            raise ValueError(
                f"name_filter={name_filter!r} is invalid: expected a regular expression ({err})"
            ) from err
    if isinstance(name_filter, re.Pattern):
        pattern = name_filter
        return lambda name: pattern.search(name) is not None
    if callable(name_filter):
        return name_filter
    raise TypeError(
        f"name_filter={name_filter!r} is invalid: expected a regex string, a callable or None"
    )


@functools.lru_cache(maxsize=64)
def _adapted_index(adapted: tuple[bool, ...], device: torch.device) -> Tensor:
    """Indices of the adapted tensors, on ``device`` (cached: one host-to-device copy)."""
    chosen = [i for i, a in enumerate(adapted) if a] or list(range(len(adapted)))
    return torch.tensor(chosen, dtype=torch.long, device=device)


def _ratio_summary(stats: StepStats) -> Tensor:
    """min, median, max of the adapted trust ratios (of all if none is adapted), on the device;
    NaN for a step without tensors."""
    ratios = stats.trust_ratio
    if ratios.numel() == 0:
        return torch.full((3,), math.nan, dtype=ratios.dtype, device=ratios.device)
    chosen = ratios.index_select(0, _adapted_index(stats.adapted, ratios.device))
    return torch.stack([chosen.min(), chosen.median(), chosen.max()])


def _adapted_lr(stats: StepStats, optimizer: LayerwiseOptimizer) -> float | Tensor:
    """The rate of the first adapted tensor (of the first tensor if none is adapted); a tensor
    rate stays a tensor (read with the others, see :func:`read_step`)."""
    lr = next((lr for lr, a in zip(stats.lr, stats.adapted, strict=True) if a), None)
    if lr is None:
        lr = stats.lr[0] if stats.lr else optimizer.param_groups[0]["lr"]
    return lr if isinstance(lr, Tensor) else float(lr)


def _scalar(value: float | int | Tensor) -> Tensor:
    """A 0-d float tensor of ``value``: a device tensor stays on its device (no host read)."""
    if isinstance(value, Tensor):
        return value.detach().float()
    return torch.tensor(float(value))


def summary_tensors(
    optimizer: object,
    *,
    prefix: str = "tvlars",
    effective_batch_size: int | None = None,
) -> dict[str, Tensor]:
    """The whole-model metrics of the last step as 0-d tensors, without a host sync.

    Values computed on the device stay there (the trust-ratio summary, ``skipped``); the
    others are CPU tensors. For consumers that read values on their own schedule, such as
    Lightning's ``callback_metrics``. Empty before the first step.
    """
    tvlars = unwrap_optimizer(optimizer)
    stats = tvlars.last_step_stats
    if stats is None:
        return {}
    summary = _ratio_summary(stats)
    out = {
        f"{prefix}/phase": _scalar(stats.phase),
        f"{prefix}/lr": _scalar(_adapted_lr(stats, tvlars)),
        f"{prefix}/skipped": stats.skipped.detach().float(),
        f"{prefix}/trust_ratio_min": summary[0],
        f"{prefix}/trust_ratio_median": summary[1],
        f"{prefix}/trust_ratio_max": summary[2],
    }
    if effective_batch_size is not None:
        out[f"{prefix}/effective_batch_size"] = torch.tensor(float(effective_batch_size))
    return out


def gradient_norms(optimizer: object) -> Tensor:
    """``||g||`` of every tensor of the last step, exact under sharding (every rank calls)."""
    tvlars = unwrap_optimizer(optimizer)
    stats = tvlars.last_step_stats
    if stats is None or not stats.params:
        return torch.zeros(0)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in stats.params]
    return tvlars.full_norms(list(stats.params), grads).to(stats.weight_norm.dtype)


@dataclass(frozen=True)
class Reading:
    """One read of a TVLARS step (see :func:`read_step`).

    Attributes:
        step: t of the step read.
        scalars: the whole-model metrics.
        per_layer: the per-layer metrics (empty with ``per_layer=False``).
        names: every tensor's name, in the optimizer's order.
        adapted: whether each tensor is adapted.
        trust_ratio: each tensor's trust ratio (1.0 where not adapted).
        ratios: the adapted trust ratios, on the device (for histograms).
        lnr: ``||w|| / ||g||`` of every tensor, on the device (for histograms).
    """

    step: int
    scalars: dict[str, float]
    per_layer: dict[str, float]
    names: tuple[str, ...]
    adapted: tuple[bool, ...]
    trust_ratio: tuple[float, ...]
    ratios: Tensor
    lnr: Tensor

    @property
    def metrics(self) -> dict[str, float]:
        """``scalars`` and ``per_layer`` together."""
        return {**self.scalars, **self.per_layer}


def _slot(value: object, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``value`` as one element of :func:`read_step`'s copy when it is a tensor (else 0)."""
    if isinstance(value, Tensor):
        return value.to(device, dtype).view(1)
    return torch.zeros(1, dtype=dtype, device=device)


def read_step(
    optimizer: object,
    grad_norm: Tensor,
    *,
    prefix: str = "tvlars",
    per_layer: bool = True,
    keep: Callable[[str], bool] | None = None,
    names: Mapping[int, str] | None = None,
    effective_batch_size: int | None = None,
) -> Reading | None:
    """Every metric of the last step, copied to the host once (``None`` before the first step).

    Args:
        optimizer: TVLARS or LAMB (or a wrapper of one).
        grad_norm: :func:`gradient_norms` of this step (computed by every rank).
        prefix: the metric prefix (see :func:`metric_prefix`).
        per_layer: include the per-layer metrics.
        keep: only layers whose name it accepts get per-layer metrics.
        names: ``id(parameter) -> name`` for groups without ``param_names``.
        effective_batch_size: reported as ``<prefix>/effective_batch_size`` when given.
    """
    tvlars = unwrap_optimizer(optimizer)
    stats = tvlars.last_step_stats
    if stats is None:
        return None
    n = len(stats.params)
    dtype, device = stats.weight_norm.dtype, stats.weight_norm.device
    # phi, the rate and t are 0-d tensors under torch.compile or with capturable=True
    phase, lr, step = stats.phase, _adapted_lr(stats, tvlars), stats.step
    packed = torch.cat(
        [
            stats.weight_norm,
            grad_norm.to(device, dtype),
            stats.trust_ratio,
            _ratio_summary(stats).to(dtype),
            stats.skipped.to(dtype).view(1),
            *(_slot(x, device, dtype) for x in (phase, lr, step)),
        ]
    ).tolist()  # the one device-to-host copy of this read
    weight_norm, grads, trust = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
    r_min, r_med, r_max, skipped, phase_value, lr_value, step_value = packed[3 * n :]
    scalars = {
        f"{prefix}/phase": phase_value if isinstance(phase, Tensor) else float(phase),
        f"{prefix}/lr": lr_value if isinstance(lr, Tensor) else float(lr),
        f"{prefix}/skipped": skipped,
        f"{prefix}/trust_ratio_min": r_min,
        f"{prefix}/trust_ratio_median": r_med,
        f"{prefix}/trust_ratio_max": r_max,
    }
    if effective_batch_size is not None:
        scalars[f"{prefix}/effective_batch_size"] = float(effective_batch_size)
    known = names or {}
    layer_names = tuple(
        name or known.get(id(p), f"param_{i}")
        for i, (name, p) in enumerate(zip(stats.names, stats.params, strict=True))
    )
    layers: dict[str, float] = {}
    if per_layer:
        for i, name in enumerate(layer_names):
            if keep is not None and not keep(name):
                continue
            layers[f"{prefix}/weight_norm/{name}"] = weight_norm[i]
            layers[f"{prefix}/grad_norm/{name}"] = grads[i]
            layers[f"{prefix}/lnr/{name}"] = (
                weight_norm[i] / grads[i] if grads[i] > 0 else float("inf")
            )
            if stats.adapted[i]:
                layers[f"{prefix}/trust_ratio/{name}"] = trust[i]
    ratios = stats.trust_ratio
    if n:
        ratios = ratios.index_select(0, _adapted_index(stats.adapted, ratios.device))
    tiny = torch.finfo(stats.weight_norm.dtype).tiny
    lnr = stats.weight_norm / grad_norm.to(stats.weight_norm).clamp_min(tiny)
    return Reading(
        step=round(step_value) if isinstance(step, Tensor) else step,
        scalars=scalars,
        per_layer=layers,
        names=layer_names,
        adapted=stats.adapted,
        trust_ratio=tuple(trust),
        ratios=ratios,
        lnr=lnr,
    )


def tvlars_metrics(
    optimizer: object,
    *,
    scheduler: Any = None,
    prefix: str = "tvlars",
    per_layer: bool = True,
    name_filter: NameFilter = None,
) -> dict[str, float]:
    """The metrics of the last TVLARS step as floats (see the module docstring).

    Call it on every rank after ``step()`` and before ``zero_grad()``; it is empty before the
    first step.

    Args:
        optimizer: :class:`~lightning_tvlars.TVLARS` or :class:`~lightning_tvlars.LAMB`, or
            Lightning's / Fabric's wrapper of one.
        scheduler: its :class:`~lightning_tvlars.TVLARSScheduler`, for
            ``<prefix>/effective_batch_size`` (omitted without one).
        prefix: ``tvlars``; ``tvlars_1``, ... for further optimizers.
        per_layer: include the per-layer metrics.
        name_filter: a regular expression (searched in the name) or a predicate; only the
            layers it accepts get per-layer metrics.

    Example:
        >>> import torch
        >>> from lightning_tvlars import TVLARS, param_groups
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = TVLARS(param_groups(model), lr=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> metrics = tvlars_metrics(opt, per_layer=False)
        >>> metrics["tvlars/phase"], metrics["tvlars/lr"], metrics["tvlars/skipped"]
        (1.0, 0.1, 0.0)
    """
    plan = getattr(scheduler, "plan", None)
    reading = read_step(
        optimizer,
        gradient_norms(optimizer),
        prefix=prefix,
        per_layer=per_layer,
        keep=compile_name_filter(name_filter),
        effective_batch_size=getattr(plan, "effective_batch_size", None),
    )
    return {} if reading is None else reading.metrics
