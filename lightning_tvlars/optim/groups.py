"""Parameter groups for TVLARS: which tensors get the trust ratio and weight decay.

Biases and every parameter of a normalization layer are *excluded*: they take plain momentum
SGD (``adapt=False``) and no weight decay, as in LARS (You et al. 2017) and the TVLARS authors'
code. The decision uses the module type and the parameter name, never only ``ndim``: under FSDP1
every parameter is a flat 1-D view, and some weights (e.g. a 1-D ``nn.Embedding`` table) are not
biases.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

from torch import Tensor, nn

from lightning_tvlars._validation import check_non_negative

#: Module types whose parameters are never adapted nor decayed.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)

#: A parameter selector: an ``fnmatch`` pattern over qualified names (``"encoder.*.bias"``) or a
#: predicate ``(name, parameter, owning_module) -> bool``.
Selector: TypeAlias = str | Callable[[str, nn.Parameter, nn.Module], bool]


def is_excluded_by_default(name: str, module: nn.Module) -> bool:
    """True for biases and for parameters of normalization layers."""
    return isinstance(module, NORM_LAYERS) or name.rsplit(".", 1)[-1] == "bias"


#: Name fragments that wrappers (FSDP1, activation checkpointing, torch.compile) insert.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without wrapper prefixes: the name users see in their own module."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _named_parameters_with_owner(module: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """Trainable parameters with their clean qualified name and the module that owns them.

    Shared (tied) parameters appear once, under their first name, as in ``named_parameters()``.
    """
    seen: set[int] = set()
    out = []
    for module_name, owner in module.named_modules():
        for local_name, param in owner.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local_name}" if module_name else local_name
            out.append((clean_name(name), param, owner))
    return out


def _matcher(selectors: Sequence[Selector], argument: str) -> Callable[..., set[int]]:
    """Return a function mapping the parameter list to the indices each selector hits.

    String patterns that hit nothing are an error (they are almost always typos).
    """
    for selector in selectors:
        if not isinstance(selector, str) and not callable(selector):
            raise TypeError(
                f"{argument} entry {selector!r} is invalid: expected an fnmatch pattern (str) or a "
                "callable (name, parameter, module) -> bool"
            )

    def hits(named: list[tuple[str, nn.Parameter, nn.Module]]) -> set[int]:
        found: set[int] = set()
        for selector in selectors:
            if isinstance(selector, str):
                matched = {
                    i for i, (n, _, _) in enumerate(named) if fnmatch.fnmatchcase(n, selector)
                }
                if not matched:
                    raise ValueError(
                        f"{argument} pattern {selector!r} matches no trainable parameter; "
                        f"names look like {[n for n, _, _ in named[:3]]}"
                    )
            else:
                matched = {i for i, (n, p, m) in enumerate(named) if selector(n, p, m)}
            found |= matched
        return found

    return hits


def param_groups(
    module: nn.Module,
    *,
    weight_decay: float = 0.0,
    exclude: Iterable[Selector] = (),
    include: Iterable[Selector] = (),
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``module``'s trainable parameters into an adapted and an excluded group.

    Args:
        module: the model; call this before or after wrapping (FSDP1 views keep their module).
        weight_decay: decay of the adapted group; the excluded group always gets 0.
        exclude: extra selectors for parameters to exclude (e.g. ``"pos_embed"``).
        include: selectors for parameters to adapt even though the default rule excludes them.
        **group_options: other TVLARS group keys (``lr``, ``trust_coefficient``...) for both groups.

    Returns:
        Up to two groups (empty ones are dropped), each with ``params``, ``param_names``,
        ``adapt`` and ``weight_decay``: ready for ``TVLARS(groups, lr=...)``.

    Raises:
        ValueError: the module has no trainable parameter, a pattern matches nothing, or a
            parameter is selected by both ``exclude`` and ``include``.
    """
    weight_decay = check_non_negative("weight_decay", weight_decay)
    named = _named_parameters_with_owner(module)
    if not named:
        raise ValueError(f"module={type(module).__name__} has no trainable parameters to optimize")
    forced_out = _matcher(list(exclude), "exclude")(named)
    forced_in = _matcher(list(include), "include")(named)
    if both := forced_out & forced_in:
        names = sorted(named[i][0] for i in both)
        raise ValueError(f"parameters {names} are selected by both exclude and include")

    adapted: list[tuple[str, Tensor]] = []
    excluded: list[tuple[str, Tensor]] = []
    for i, (name, param, owner) in enumerate(named):
        local_name = name.rsplit(".", 1)[-1]
        default_out = is_excluded_by_default(local_name, owner)
        target = excluded if (i in forced_out or (default_out and i not in forced_in)) else adapted
        target.append((name, param))

    groups = []
    for members, adapt, decay in ((adapted, True, weight_decay), (excluded, False, 0.0)):
        if members:
            groups.append(
                {
                    "params": [p for _, p in members],
                    "param_names": [n for n, _ in members],
                    "adapt": adapt,
                    "weight_decay": decay,
                    **group_options,
                }
            )
    return groups


def split_by_ndim(params: Iterable[Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """The authors' rule: tensors with ``ndim <= 1`` are neither adapted nor decayed.

    Only for plain parameter lists; prefer :func:`param_groups` when you have the module.
    """
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim > 1], "adapt": True, "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "adapt": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
