"""TVLARS by name in timm: ``timm.optim.create_optimizer_v2(model, opt="tvlars", ...)``.

timm builds the parameter groups itself (weight decay off for 1-D parameters and the model's
``no_weight_decay()`` names; ``lr_scale`` per group with ``layer_decay``) and hands them to the
optimizer class. The class registered here splits each group by the authors' rule
(:func:`~lightning_tvlars.optim.groups.split_groups_by_ndim`: 1-D tensors are not adapted),
keeps every other key, and builds :class:`~lightning_tvlars.TVLARS`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lightning_tvlars.optim.groups import split_groups_by_ndim
from lightning_tvlars.optim.tvlars import TVLARS


def tvlars_for_timm(params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> TVLARS:
    """``TVLARS`` over timm's parameter groups (or tensors), split into adapted / excluded."""
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    return TVLARS(split_groups_by_ndim(groups), **kwargs)  # type: ignore[arg-type]


def register_with_timm(name: str = "tvlars") -> None:
    """Make ``timm.optim.create_optimizer_v2(..., opt=name)`` build TVLARS (idempotent).

    Examples:
        >>> import timm.optim, torch
        >>> from lightning_tvlars.optim.timm_registry import register_with_timm
        >>> register_with_timm()
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = timm.optim.create_optimizer_v2(model, opt="tvlars", lr=1.0, weight_decay=5e-4)
        >>> [(len(g["params"]), g["adapt"], g["weight_decay"]) for g in opt.param_groups]
        [(3, False, 0.0), (1, True, 0.0005)]
    """
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError as err:  # pragma: no cover - timm is in the dev and bench extras
        raise ImportError(
            "register_with_timm needs timm>=1.0.12 (its optimizer registry): "
            "pip install -U 'timm>=1.0.12'"
        ) from err
    if name in default_registry.list_optimizers():
        return
    default_registry.register(
        OptimInfo(
            name=name,
            opt_class=tvlars_for_timm,  # type: ignore[arg-type]  # any callable works
            description="Time-Varying LARS (arXiv 2309.14053): LARS with a decaying phase",
            has_eps=False,
            has_momentum=True,
        )
    )
