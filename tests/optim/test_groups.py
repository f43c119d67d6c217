"""param_groups: biases and normalization parameters are excluded by type and name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tvlars import param_groups


def _names(groups: list[dict], adapt: bool) -> list[str]:
    return [n for g in groups if g["adapt"] is adapt for n in g["param_names"]]


def test_default_split_by_module_type_and_name(small_model: nn.Module) -> None:
    groups = param_groups(small_model, weight_decay=5e-4, lr=0.3)
    assert _names(groups, True) == ["0.weight", "4.weight", "6.weight"]
    assert _names(groups, False) == ["0.bias", "1.weight", "1.bias", "4.bias", "5.weight", "5.bias"]
    adapted, excluded = groups
    assert adapted["weight_decay"] == 5e-4 and excluded["weight_decay"] == 0.0
    assert adapted["lr"] == excluded["lr"] == 0.3
    assert [p for g in groups for p in g["params"]] != []
    assert len({id(p) for g in groups for p in g["params"]}) == len(list(small_model.parameters()))


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm2d(3),
        nn.GroupNorm(1, 3),
        nn.InstanceNorm1d(3, affine=True),
        nn.RMSNorm(3),
        nn.SyncBatchNorm(3),
        nn.LayerNorm(3, bias=False),
    ],
)
def test_every_normalization_layer_is_excluded(norm: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(3, 3, bias=False), norm)
    groups = param_groups(model)
    assert _names(groups, True) == ["0.weight"]
    assert set(_names(groups, False)) == {f"1.{n}" for n, _ in norm.named_parameters()}


def test_decision_is_not_by_ndim() -> None:
    """A 1-D weight of a non-norm layer is adapted; a 2-D norm parameter would not be."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    model = nn.Sequential(Scale(), nn.Embedding(10, 4))
    assert _names(param_groups(model), True) == ["0.weight", "1.weight"]


def test_overrides_with_patterns_and_predicates(small_model: nn.Module) -> None:
    groups = param_groups(small_model, exclude=["6.*"], include=[lambda n, p, m: n == "4.bias"])
    assert _names(groups, True) == ["0.weight", "4.weight", "4.bias"]
    assert "6.weight" in _names(groups, False)


def test_tied_and_frozen_parameters_appear_once_or_not_at_all() -> None:
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    frozen = nn.Linear(3, 3)
    frozen.requires_grad_(False)
    groups = param_groups(nn.ModuleDict({"emb": emb, "head": head, "frozen": frozen}))
    assert _names(groups, True) == ["emb.weight"] and _names(groups, False) == []


def test_errors_name_the_problem(small_model: nn.Module) -> None:
    with pytest.raises(
        ValueError, match=r"exclude pattern 'encoder\.\*' matches no trainable parameter"
    ):
        param_groups(small_model, exclude=["encoder.*"])
    with pytest.raises(
        ValueError, match=r"\['0.weight'\] are selected by both exclude and include"
    ):
        param_groups(small_model, exclude=["0.weight"], include=["0.*"])
    with pytest.raises(ValueError, match="module=Identity has no trainable parameters"):
        param_groups(nn.Identity())
    with pytest.raises(TypeError, match="include entry 3 is invalid"):
        param_groups(small_model, include=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="weight_decay=-1 is invalid"):
        param_groups(small_model, weight_decay=-1)


def second_layer(name: str, parameter: nn.Parameter, module: nn.Module) -> bool:
    """A predicate that a config names as ``"@test_groups:second_layer"``."""
    return name.startswith("4.")


def test_rules_by_name_select_biases_norms_or_an_imported_predicate(small_model: nn.Module) -> None:
    """``"@..."`` selectors are strings: YAML files and weights_only checkpoints can hold them."""
    from lightning_tvlars import GroupOverride

    groups = param_groups(small_model, overrides=[GroupOverride(match="@norm", lr_scale=0.5)])
    scaled = [n for g in groups if g.get("lr_scale") == 0.5 for n in g["param_names"]]
    assert scaled == ["1.weight", "1.bias", "5.weight", "5.bias"]
    biases_in = param_groups(small_model, include=["@bias"])
    adapted = ["0.weight", "0.bias", "1.bias", "4.weight", "4.bias", "5.bias", "6.weight"]
    assert _names(biases_in, True) == adapted  # every bias, norm layers' too
    imported = param_groups(small_model, exclude=["@test_groups:second_layer"])
    assert _names(imported, True) == ["0.weight", "6.weight"]
    for bad in ("@nope", "@lightning_tvlars.optim.groups:RULES", "@no.such.module:f"):
        with pytest.raises(ValueError, match=r"selector '@.*' is invalid: expected one of @bias"):
            param_groups(small_model, exclude=[bad])
