"""The family by name in timm: ``create_optimizer_v2(model, opt="tvlars", decay=..., delay=...)``.

:func:`register_with_timm` registers four names (timm splits names on ``_``, so none has one):

======================  =====================================================================
``tvlars``              :class:`~lightning_tvlars.TVLARS` with a phase
``tvlamb``              :class:`~lightning_tvlars.LAMB` with a phase (time-varying LAMB)
``larsnophase``         TVLARS without a phase: LARS as Barlow Twins and SimCLR use it
``lambnophase``         LAMB without a phase (the same steps as timm's ``lamb``)
======================  =====================================================================

The phase is given with plain numbers, as timm's ``--opt-kwargs`` passes them:
``decay`` (per optimizer step) and ``delay`` (in optimizer steps), optionally ``alpha`` and
``floor`` (:class:`~lightning_tvlars.SigmoidPhase`), e.g.
``train.py --opt tvlars --opt-kwargs decay=1e-3 delay=5000``. timm knows no run length, so the
phase cannot be fitted to it here: ``tvlars`` and ``tvlamb`` without ``decay`` and ``delay`` are
refused with a message that names them.

timm builds the parameter groups itself (weight decay off for 1-D parameters and the model's
``no_weight_decay()`` names, ``lr_scale`` per group with ``layer_decay``); each group is split by
the authors' rule (1-D tensors are not adapted, :func:`~lightning_tvlars.optim.groups.
split_groups_by_ndim`) and keeps its other keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_tvlars.optim.base import LayerwiseOptimizer
from lightning_tvlars.optim.groups import split_groups_by_ndim
from lightning_tvlars.optim.lamb import LAMB
from lightning_tvlars.optim.tvlars import TVLARS
from lightning_tvlars.phase import SigmoidPhase

Params = Iterable[Tensor] | Iterable[dict[str, Any]]
PHASE_KWARGS = ("decay", "delay", "alpha", "floor")


def _groups(params: Params) -> list[dict[str, Any]]:
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    return split_groups_by_ndim(groups)  # type: ignore[arg-type]


def _with_phase(cls: type[LayerwiseOptimizer], name: str, plain: str) -> Callable[..., Optimizer]:
    def build(params: Params, **kwargs: Any) -> Optimizer:
        given = {k: kwargs.pop(k) for k in PHASE_KWARGS if k in kwargs}
        if "decay" not in given or "delay" not in given:
            raise ValueError(
                f"opt={name!r} needs its phase: pass decay=... (per optimizer step) and "
                "delay=... (in optimizer steps), optionally alpha=... and floor=..., e.g. "
                f"timm's --opt-kwargs decay=1e-3 delay=5000 (got {given or 'none'}); for "
                f"{cls.__name__} without a phase use opt={plain!r}"
            )
        return cls(_groups(params), phase=SigmoidPhase(**given), **kwargs)

    build.__name__ = f"{name}_for_timm"
    return build


def _without_phase(
    cls: type[LayerwiseOptimizer], name: str, phased: str
) -> Callable[..., Optimizer]:
    def build(params: Params, **kwargs: Any) -> Optimizer:
        phase = sorted(k for k in PHASE_KWARGS if k in kwargs)
        if phase:
            raise ValueError(
                f"opt={name!r} has no phase, but {', '.join(phase)} were given: use opt={phased!r}"
            )
        return cls(_groups(params), **kwargs)

    build.__name__ = f"{name}_for_timm"
    return build


#: name -> (builder, description, has_betas, has_momentum)
REGISTRY: dict[str, tuple[Callable[..., Optimizer], str, bool, bool]] = {
    "tvlars": (
        _with_phase(TVLARS, "tvlars", "larsnophase"),
        "Time-Varying LARS (arXiv 2309.14053): LARS whose trust ratio a decaying phase scales "
        "(decay, delay in steps)",
        False,
        True,
    ),
    "tvlamb": (
        _with_phase(LAMB, "tvlamb", "lambnophase"),
        "Time-varying LAMB: LAMB whose trust ratio a decaying phase scales (decay, delay)",
        True,
        False,
    ),
    "larsnophase": (
        _without_phase(TVLARS, "larsnophase", "tvlars"),
        "LARS in the Barlow Twins / SimCLR form (lightning-tvlars, no phase)",
        False,
        True,
    ),
    "lambnophase": (
        _without_phase(LAMB, "lambnophase", "tvlamb"),
        "LAMB (lightning-tvlars' multi-tensor implementation, timm's Lamb steps)",
        True,
        False,
    ),
}


def register_with_timm() -> None:
    """Make ``timm.optim.create_optimizer_v2(..., opt=NAME)`` build the family (idempotent).

    Examples:
        >>> import timm.optim, torch
        >>> from lightning_tvlars import register_with_timm
        >>> register_with_timm()
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = timm.optim.create_optimizer_v2(
        ...     model, opt="tvlars", lr=1.0, weight_decay=5e-4, decay=1e-3, delay=100)
        >>> [(len(g["params"]), g["adapt"], g["weight_decay"]) for g in opt.param_groups]
        [(3, False, 0.0), (1, True, 0.0005)]
        >>> opt.phase
        SigmoidPhase(alpha=1, decay=0.001, delay=100, floor=0)
    """
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError as err:  # pragma: no cover - timm is in the dev and bench extras
        raise ImportError(
            "register_with_timm needs timm>=1.0.12 (its optimizer registry): "
            "pip install -U 'timm>=1.0.12'"
        ) from err
    known = set(default_registry.list_optimizers())
    for name, (build, description, betas, momentum) in REGISTRY.items():
        if name in known:
            continue
        default_registry.register(
            OptimInfo(
                name=name,
                opt_class=build,  # type: ignore[arg-type]  # any callable works
                description=description,
                has_eps=betas,
                has_betas=betas,
                has_momentum=momentum,
            )
        )
