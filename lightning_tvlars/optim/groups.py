"""Parameter groups for TVLARS: which tensors get the trust ratio, weight decay and which LR.

Biases and every parameter of a normalization layer are *excluded* by default: they take plain
momentum SGD (``adapt=False``) and no weight decay, as in LARS (You et al. 2017) and the TVLARS
authors' code. The decision uses the module type and the parameter name, never only ``ndim``:
under FSDP1 every parameter is a flat 1-D view, and some weights (e.g. a 1-D ``nn.Embedding``
table) are not biases.

On top of the default split, :func:`param_groups` takes

* ``select``: which parameters to optimize at all (patterns; default every trainable one),
* ``exclude`` / ``include``: force parameters out of or into adaptation,
* ``overrides``: per-pattern learning-rate multiplier, weight decay and adaptation
  (:class:`GroupOverride`), e.g. lightly's recipes (a smaller LR for biases and norms, an
  online classifier neither decayed nor adapted),
* ``groups``: parameter groups built by another library (timm's layer-wise LR decay), each
  split by the same rule, every other key of the group carried along.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from torch import Tensor, nn

from lightning_tvlars._validation import check_non_negative, check_positive

#: Module types whose parameters are never adapted nor decayed.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)

#: A parameter selector: an ``fnmatch`` pattern over qualified names (``"encoder.*.bias"``), a
#: rule by name (``"@bias"``, ``"@norm"``, ``"@excluded"``: both, ``"@package.module:function"``:
#: a predicate to import), or a predicate ``(name, parameter, owning_module) -> bool``. Strings
#: are what YAML files and checkpoints (``weights_only=True``) can hold.
Selector: TypeAlias = str | Callable[[str, nn.Parameter, nn.Module], bool]
Predicate: TypeAlias = Callable[[str, nn.Parameter, nn.Module], bool]


@dataclass
class GroupOverride:
    """Options for the parameters that ``match`` selects; ``None`` keeps the default.

    Args:
        match: selectors (patterns or predicates, see :data:`Selector`); a single pattern may be
            given as a string.
        lr_scale: multiplier of the learning rate for these parameters (the ``lr_scale`` group
            key, which timm's schedulers and :class:`~lightning_tvlars.TVLARSScheduler` apply;
            TVLARS itself only carries it).
        weight_decay: weight decay for these parameters.
        adapt: whether they get the trust ratio and phase.

    Later overrides take precedence over earlier ones for the options they set.
    """

    match: str | list[Selector]
    lr_scale: float | None = None
    weight_decay: float | None = None
    adapt: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.match, str):
            self.match = [self.match]
        if self.lr_scale is not None:
            check_positive("lr_scale", self.lr_scale)
        if self.weight_decay is not None:
            check_non_negative("weight_decay", self.weight_decay)
        if self.adapt is not None and not isinstance(self.adapt, bool):
            raise TypeError(f"adapt={self.adapt!r} is invalid: expected True, False or None")


def is_excluded_by_default(name: str, module: nn.Module) -> bool:
    """True for biases and for parameters of normalization layers."""
    return isinstance(module, NORM_LAYERS) or name.rsplit(".", 1)[-1] == "bias"


#: The rules ``"@name"`` selectors name (see :data:`Selector`).
RULES: dict[str, Predicate] = {
    "bias": lambda name, p, m: name.rsplit(".", 1)[-1] == "bias",
    "norm": lambda name, p, m: isinstance(m, NORM_LAYERS),
    "excluded": lambda name, p, m: is_excluded_by_default(name, m),
}


def rule(selector: str) -> Predicate:
    """The predicate of an ``"@..."`` selector: a rule of :data:`RULES` or an import path."""
    key = selector[1:]
    if key in RULES:
        return RULES[key]
    module, _, name = key.partition(":")
    try:
        found = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError, ValueError):
        found = None
    if not callable(found):
        raise ValueError(
            f"selector {selector!r} is invalid: expected one of "
            f"{', '.join('@' + r for r in RULES)} or @package.module:function naming a "
            "predicate (name, parameter, module) -> bool"
        )
    return found


#: Name fragments that wrappers (FSDP1, activation checkpointing, torch.compile) insert.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without wrapper prefixes: the name users see in their own module."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


Named: TypeAlias = list[tuple[str, nn.Parameter, nn.Module]]


def _named_parameters_with_owner(module: nn.Module) -> Named:
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


def _check_selectors(selectors: Sequence[Selector], argument: str) -> None:
    for selector in selectors:
        if not isinstance(selector, str) and not callable(selector):
            raise TypeError(
                f"{argument} entry {selector!r} is invalid: expected an fnmatch pattern (str) or a "
                "callable (name, parameter, module) -> bool"
            )


def _hits(named: Named, selectors: Sequence[Selector], argument: str) -> set[int]:
    """Indices of ``named`` that any selector hits; a pattern that hits nothing is an error
    (almost always a typo)."""
    _check_selectors(selectors, argument)
    found: set[int] = set()
    for selector in selectors:
        if isinstance(selector, str) and selector.startswith("@"):
            selector = rule(selector)
        if isinstance(selector, str):
            matched = {i for i, (n, _, _) in enumerate(named) if fnmatch.fnmatchcase(n, selector)}
            if not matched:
                raise ValueError(
                    f"{argument} pattern {selector!r} matches no trainable parameter; "
                    f"names look like {[n for n, _, _ in named[:3]]}"
                )
        else:
            matched = {i for i, (n, p, m) in enumerate(named) if selector(n, p, m)}
        found |= matched
    return found


def param_groups(
    module: nn.Module,
    *,
    weight_decay: float = 0.0,
    exclude: Iterable[Selector] = (),
    include: Iterable[Selector] = (),
    select: Iterable[Selector] | None = None,
    overrides: Iterable[GroupOverride] = (),
    groups: Iterable[dict[str, Any]] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Parameter groups of ``module`` with TVLARS's adapt / weight-decay split.

    Args:
        module: the model (or a submodule); call this before or after wrapping (FSDP1 views
            keep their module).
        weight_decay: decay of adapted parameters; excluded ones get 0.
        exclude: extra selectors for parameters to exclude (e.g. ``"pos_embed"``).
        include: selectors for parameters to adapt even though the default rule excludes them.
        select: optimize only the parameters these selectors hit (default: every trainable
            parameter of ``module``).
        overrides: :class:`GroupOverride` entries, applied in order.
        groups: parameter groups built elsewhere (e.g. ``timm.optim.param_groups_layer_decay``)
            over ``module``'s parameters: each is split into an adapted and an excluded part,
            and keeps its other keys (its ``weight_decay`` for the adapted part, ``lr_scale``,
            ...). ``select`` does not apply then.
        **group_options: other TVLARS group keys (``lr``, ``trust_coefficient``...) for all.

    Returns:
        Non-empty groups with ``params``, ``param_names``, ``adapt`` and ``weight_decay`` (and
        ``lr_scale`` where an override set one), ready for ``TVLARS(groups, lr=...)``.

    Raises:
        ValueError: no trainable parameter, a pattern that matches nothing, a parameter that
            both ``exclude`` and ``include`` select, or a foreign group holding a parameter that
            is not ``module``'s.
    """
    weight_decay = check_non_negative("weight_decay", weight_decay)
    named = _named_parameters_with_owner(module)
    if not named:
        raise ValueError(f"module={type(module).__name__} has no trainable parameters to optimize")
    forced_out = _hits(named, list(exclude), "exclude")
    forced_in = _hits(named, list(include), "include")
    if both := forced_out & forced_in:
        names = sorted(named[i][0] for i in both)
        raise ValueError(f"parameters {names} are selected by both exclude and include")
    overrides = list(overrides)
    for override in overrides:
        if not isinstance(override, GroupOverride):
            raise TypeError(f"overrides entry {override!r} is invalid: expected a GroupOverride")
    matched = [_hits(named, list(o.match), "override match") for o in overrides]

    if groups is None:
        chosen = (
            sorted(_hits(named, list(select), "select"))
            if select is not None
            else list(range(len(named)))
        )
        sources: list[tuple[dict[str, Any], list[int]]] = [({}, chosen)]
    else:
        position = {id(p): i for i, (_, p, _) in enumerate(named)}
        sources = []
        for group in groups:
            members = list(group["params"])
            unknown = [p for p in members if id(p) not in position]
            if unknown:
                raise ValueError(
                    f"a group in groups= holds {len(unknown)} parameter(s) that are not trainable "
                    f"parameters of module={type(module).__name__}"
                )
            extra = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            sources.append((extra, [position[id(p)] for p in members]))

    out: list[dict[str, Any]] = []
    for extra, members in sources:
        split: dict[tuple[bool, float, float | None], list[int]] = {}
        for i in members:
            name, _, owner = named[i]
            default_out = is_excluded_by_default(name.rsplit(".", 1)[-1], owner)
            adapt = not (i in forced_out or (default_out and i not in forced_in))
            decay: float = extra.get("weight_decay", weight_decay) if adapt else 0.0
            lr_scale = extra.get("lr_scale")
            for override, hit in zip(overrides, matched, strict=True):
                if i in hit:
                    adapt = override.adapt if override.adapt is not None else adapt
                    decay = override.weight_decay if override.weight_decay is not None else decay
                    lr_scale = override.lr_scale if override.lr_scale is not None else lr_scale
            split.setdefault((adapt, decay, lr_scale), []).append(i)
        for (adapt, decay, lr_scale), indices in split.items():
            group = {
                **extra,
                "params": [named[i][1] for i in indices],
                "param_names": [named[i][0] for i in indices],
                "adapt": adapt,
                "weight_decay": decay,
                **group_options,
            }
            if lr_scale is not None:
                group["lr_scale"] = lr_scale
            out.append(group)
    return out


def split_by_ndim(params: Iterable[Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """The authors' rule: 1-D tensors (biases, norm weights) are neither adapted nor decayed.

    Everything else is, 0-d tensors included, as in the authors' ``p.ndim == 1`` test. Only for
    plain parameter lists; prefer :func:`param_groups` when you have the module.
    """
    return split_groups_by_ndim([{"params": list(params), "weight_decay": weight_decay}])


def split_groups_by_ndim(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The authors' rule within each of ``groups``, keeping every other key of the group.

    For groups built without the module (e.g. by ``timm.optim.create_optimizer_v2``): 1-D
    tensors go to an ``adapt=False`` part without weight decay; the others to an adapted part
    with the group's own weight decay (the optimizer's default if the group sets none).
    """
    out = []
    for group in groups:
        params = list(group["params"])
        names = group.get("param_names")
        extra = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        for adapt in (True, False):
            members = [i for i, p in enumerate(params) if (p.ndim != 1) == adapt]
            if not members:
                continue
            part = {**extra, "params": [params[i] for i in members], "adapt": adapt}
            if names:
                part["param_names"] = [names[i] for i in members]
            if not adapt:
                part["weight_decay"] = 0.0
            out.append(part)
    return out
