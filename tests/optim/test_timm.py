"""The family in timm's hands: its parameter groups and schedulers, its optimizer factory and
the command line of its ``train.py`` (``--opt tvlars --opt-kwargs decay=... delay=...``)."""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest
import torch
from optimizers import Oracle, params_of
from torch import nn

import lightning_tvlars
from lightning_tvlars import LAMB, TVLARS, SigmoidPhase, register_with_timm
from lightning_tvlars.optim import NORM_LAYERS

pytestmark = pytest.mark.optim

timm = pytest.importorskip("timm")
pytest.importorskip("timm.scheduler")
pytest.importorskip("timm.utils")


def _vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=4
    )


def _vit_backward(model: nn.Module, i: int) -> None:
    gen = torch.Generator().manual_seed(700 + i)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _cosine(base: float, t: int, t_initial: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * t / t_initial))


def _timm_cosine(opt: torch.optim.Optimizer, factory: str) -> Any:
    if factory == "create_scheduler_v2":
        sched, epochs = timm.scheduler.create_scheduler_v2(opt, sched="cosine", num_epochs=5)
        assert epochs == 5
        return sched
    return timm.scheduler.CosineLRScheduler(opt, t_initial=5, lr_min=0.0)


def train_py_optimizer(model: nn.Module, argv: list[str]) -> torch.optim.Optimizer:
    """What timm's ``train.py`` does with its optimizer flags: its argparse options (the ones
    the factory reads), ``ParseKwargs`` for ``--opt-kwargs``, then
    ``create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--opt", default="sgd", type=str)
    parser.add_argument("--opt-eps", default=None, type=float)
    parser.add_argument("--opt-betas", default=None, type=float, nargs="+")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=2e-5)
    parser.add_argument("--layer-decay", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--opt-kwargs", nargs="*", default={}, action=timm.utils.ParseKwargs)
    args = parser.parse_args(argv)
    return timm.optim.create_optimizer_v2(
        model, **timm.optim.optimizer_kwargs(cfg=args), **args.opt_kwargs
    )


@pytest.fixture(autouse=True)
def _registered() -> None:
    register_with_timm()
    register_with_timm()  # idempotent


def test_every_name_is_registered_without_an_underscore() -> None:
    names = ("tvlars", "tvlamb", "larsnophase", "lambnophase")
    for name in names:
        assert timm.optim.list_optimizers(name) == [name]
        assert "_" not in name  # timm splits names on "_"
    assert lightning_tvlars.register_with_timm is register_with_timm


@pytest.mark.parametrize(("opt", "cls"), [("tvlars", TVLARS), ("tvlamb", LAMB)])
def test_train_py_sets_the_phase_with_plain_numbers(opt: str, cls: type) -> None:
    model = _vit()
    argv = ["--opt", opt, "--lr", "0.1", "--weight-decay", "0.05"]
    optimizer = train_py_optimizer(model, [*argv, "--opt-kwargs", "decay=1e-3", "delay=500"])
    assert isinstance(optimizer, cls)
    assert optimizer.phase == SigmoidPhase(decay=1e-3, delay=500)
    _vit_backward(model, 0)
    optimizer.step()
    stats = optimizer.last_step_stats
    assert stats.phase == SigmoidPhase(decay=1e-3, delay=500)(0) != 1.0
    assert any(stats.adapted) and not all(stats.adapted)
    full = train_py_optimizer(
        _vit(), [*argv, "--opt-kwargs", "decay=0.01", "delay=20", "alpha=0.5", "floor=0.1"]
    )
    assert full.phase == SigmoidPhase(alpha=0.5, decay=0.01, delay=20, floor=0.1)


@pytest.mark.parametrize(("opt", "plain"), [("tvlars", "larsnophase"), ("tvlamb", "lambnophase")])
def test_a_phased_name_without_its_phase_is_refused_naming_the_kwargs(opt: str, plain: str) -> None:
    with pytest.raises(
        ValueError, match=rf"opt='{opt}' needs its phase: pass decay=.*delay=.*opt='{plain}'"
    ):
        train_py_optimizer(_vit(), ["--opt", opt, "--lr", "0.1"])
    with pytest.raises(ValueError, match="needs its phase"):
        train_py_optimizer(_vit(), ["--opt", opt, "--lr", "0.1", "--opt-kwargs", "decay=1e-3"])


@pytest.mark.parametrize(("opt", "cls"), [("larsnophase", TVLARS), ("lambnophase", LAMB)])
def test_the_names_without_a_phase_build_phi_equal_one(opt: str, cls: type) -> None:
    model = _vit()
    optimizer = train_py_optimizer(model, ["--opt", opt, "--lr", "0.1"])
    assert isinstance(optimizer, cls) and optimizer.phase is None
    _vit_backward(model, 0)
    optimizer.step()
    assert optimizer.last_step_stats.phase == 1.0
    with pytest.raises(ValueError, match=f"opt='{opt}' has no phase, but decay were given"):
        train_py_optimizer(_vit(), ["--opt", opt, "--opt-kwargs", "decay=1e-3"])


def test_lamb_takes_timms_betas_and_eps_flags() -> None:
    optimizer = train_py_optimizer(
        _vit(),
        ["--opt", "lambnophase", "--lr", "0.01", "--opt-betas", "0.8", "0.99", "--opt-eps", "1e-8"],
    )
    assert optimizer.defaults["betas"] == [0.8, 0.99] and optimizer.defaults["eps"] == 1e-8


@pytest.mark.parametrize("layer_decay", [None, 0.75], ids=["no_layer_decay", "layer_decay"])
def test_the_factory_splits_timms_groups_and_keeps_their_keys(layer_decay: float | None) -> None:
    model = _vit()
    no_decay_names = set(model.no_weight_decay())
    opt = timm.optim.create_optimizer_v2(
        model,
        opt="tvlars",
        lr=0.1,
        weight_decay=0.05,
        layer_decay=layer_decay,
        foreach=False,
        decay=1e-3,
        delay=10,
    )
    assert isinstance(opt, TVLARS) and opt.defaults["foreach"] is False
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(id(p) for p in params_of(opt)) == sorted(names)
    if layer_decay is not None:
        timm_groups = timm.optim.param_groups_layer_decay(
            model, weight_decay=0.05, layer_decay=layer_decay, no_weight_decay_list=no_decay_names
        )
        scale_of = {id(p): g["lr_scale"] for g in timm_groups for p in g["params"]}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if p.ndim <= 1:
                assert group["adapt"] is False and group["weight_decay"] == 0.0, name
            elif name not in no_decay_names:
                assert group["adapt"] is True and group["weight_decay"] == 0.05, name
            if layer_decay is not None:
                assert group["lr_scale"] == scale_of[id(p)], name
    _vit_backward(model, 0)
    opt.step()
    assert opt.step_count == 1


@pytest.mark.parametrize("factory", ["CosineLRScheduler", "create_scheduler_v2"])
@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "forloop"])
def test_timm_layer_decay_groups_and_scheduler_apply_lr_scale(
    foreach: bool | None, factory: str
) -> None:
    model = _vit()
    groups = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert len({g["lr_scale"] for g in groups}) > 1
    opt = TVLARS(groups, lr=0.1, trust_coefficient=0.02, foreach=foreach)
    sched = _timm_cosine(opt, factory)
    oracle = Oracle(opt, phased=False)
    for epoch in range(3):
        for group in opt.param_groups:
            expected = _cosine(0.1, epoch, 5) * group["lr_scale"]
            assert math.isclose(group["lr"], expected, rel_tol=1e-12), (epoch, group["lr"])
        _vit_backward(model, epoch)
        oracle.step()  # reads each group's lr: the lr the step must apply
        opt.step()
        sched.step(epoch + 1)
    oracle.check()
    assert opt.step_count == 3


def _hand_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Foreign groups that mix weights, biases and norms: blocks vs the rest."""
    blocks = list(model.blocks.parameters())
    ids = {id(p) for p in blocks}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": blocks, "lr_scale": 0.5, "weight_decay": 0.05, "name": "blocks", "tag": 7},
        {"params": rest, "lr_scale": 1.0, "weight_decay": 0.02, "name": "rest"},
    ]


@pytest.mark.parametrize("source", ["layer_decay", "hand_made"])
def test_param_groups_splits_foreign_groups_and_keeps_their_keys(source: str) -> None:
    model = _vit()
    if source == "layer_decay":
        foreign = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    else:
        foreign = _hand_groups(model)
    foreign_of = {id(p): g for g in foreign for p in g["params"]}
    owners = {
        id(p): (f"{mname}.{pname}" if mname else pname, module)
        for mname, module in model.named_modules()
        for pname, p in module.named_parameters(recurse=False)
    }
    groups = lightning_tvlars.param_groups(model, groups=foreign)
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters()), "each param exactly once"
    assert len(groups) <= 2 * len(foreign)
    kinds = set()
    for group in groups:
        source_group = foreign_of[id(group["params"][0])]
        assert all(foreign_of[id(p)] is source_group for p in group["params"]), "mixed origins"
        for key, value in source_group.items():
            if key not in ("params", "weight_decay", "param_names"):
                assert group[key] == value, f"key {key!r} not carried"
        for p in group["params"]:
            name, module = owners[id(p)]
            excluded = isinstance(module, NORM_LAYERS) or name.endswith(".bias")
            kinds.add(excluded)
            if excluded:
                assert group["adapt"] is False and group["weight_decay"] == 0.0, name
            else:
                assert group["adapt"] is True, name
                assert group["weight_decay"] == source_group["weight_decay"], name
    assert kinds == {True, False}
    opt = LAMB(groups, lr=0.01)
    sched = _timm_cosine(opt, "CosineLRScheduler")
    for epoch in range(2):
        _vit_backward(model, epoch)
        opt.step()
        sched.step(epoch + 1)
        for group in opt.param_groups:
            expected = _cosine(0.01, epoch + 1, 5) * group["lr_scale"]
            assert math.isclose(group["lr"], expected, rel_tol=1e-12)
