"""TVLARS: the update rule, both code paths, resume, host syncs, non-finite steps, bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_impl import PlainTVLARS
from torch import nn

from lightning_tvlars import TVLARS, SigmoidPhase, param_groups, trust_ratio
from lightning_tvlars.optim.groups import split_by_ndim

PHASE = (1.0, 0.3, 2.0, 0.05)  # alpha, decay, delay, floor: phi changes a lot over 6 steps


def _make_tensors() -> list[torch.Tensor]:
    """Several shapes, including a zero weight tensor (||w|| = 0)."""
    shapes = [(4, 3), (3,), (2, 2, 3), (5,), (6, 1)]
    ts = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ts[2].zero_()
    return ts


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    grads[4].zero_()  # ||u|| = 0 for an undecayed group
    return grads


def _run_pair(foreach: bool, phase: bool, clip: float | None, steps: int = 6) -> tuple[list, list]:
    params = _make_tensors()
    ours = [p.clone().requires_grad_() for p in params]
    plain = [p.clone() for p in params]
    spec = [  # (indices, lr, momentum, weight_decay, eta, adapt)
        ([0, 2], 0.5, 0.9, 1e-2, 2e-2, True),
        ([1, 3], 0.1, 0.8, 0.0, 1.0, False),
        ([4], 0.3, 0.0, 0.0, 5e-2, True),
    ]
    opt = TVLARS(
        [
            {
                "params": [ours[i] for i in idx],
                "lr": lr,
                "momentum": m,
                "weight_decay": wd,
                "trust_coefficient": eta,
                "adapt": adapt,
            }
            for idx, lr, m, wd, eta, adapt in spec
        ],
        lr=1.0,
        norm_clip=clip,
        foreach=foreach,
        phase=SigmoidPhase(*PHASE) if phase else None,
    )
    ref = PlainTVLARS(
        [
            {
                "params": [plain[i] for i in idx],
                "lr": lr,
                "momentum": m,
                "weight_decay": wd,
                "eta": eta,
                "clip": clip,
                "adapt": adapt,
            }
            for idx, lr, m, wd, eta, adapt in spec
        ],
        PHASE if phase else None,
    )
    for step in range(steps):
        grads = _grads(params, step)
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step({id(p): g for p, g in zip(plain, grads, strict=True)})
    return ours, plain


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("phase", [True, False])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_update_rule_matches_plain_implementation(
    foreach: bool, phase: bool, clip: float | None
) -> None:
    ours, plain = _run_pair(foreach, phase, clip)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
    # the zero weight tensor moved: r = 1 there, so it is not frozen at zero
    assert ours[2].detach().abs().sum() > 0


def test_foreach_and_single_tensor_paths_agree(small_model: torch.nn.Module) -> None:
    models = [small_model, copy.deepcopy(small_model)]
    opts = [
        TVLARS(
            param_groups(m, weight_decay=5e-4),
            lr=2.0,
            phase=SigmoidPhase(decay=0.2, delay=3),
            foreach=foreach,
        )
        for m, foreach in zip(models, [True, False], strict=True)
    ]
    x = torch.randn(16, 1, 8)
    for _ in range(5):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_phase_none_is_lars_and_adapt_false_is_momentum_sgd() -> None:
    w = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    sgd_b = b.detach().clone().requires_grad_()
    opt = TVLARS([{"params": [w]}, {"params": [b], "adapt": False}], lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD([sgd_b], lr=0.1, momentum=0.9)
    w0 = w.detach().clone()
    g = torch.randn(5, 4)
    w.grad, b.grad, sgd_b.grad = g, torch.ones(4), torch.ones(4)
    opt.step()
    sgd.step()
    expected = w0 - 0.1 * 1e-3 * w0.norm() / g.norm() * g
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(b.detach(), sgd_b.detach())


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_adapted_step_is_invariant_to_gradient_scale(scale: float, seed: int) -> None:
    """Without weight decay, r * u = eta ||w|| u / ||u||: the step ignores the gradient's scale."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    results = []
    for s in (1.0, scale):
        w = w0.clone().requires_grad_()
        w.grad = g * s
        TVLARS([w], lr=1.0, phase=SigmoidPhase(decay=0.1)).step()
        results.append(w.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-3, 10), eta=st.floats(1e-4, 1.0), clip=st.one_of(st.none(), st.floats(0.1, 10))
)
def test_first_step_length_is_lr_phi_times_clipped_ratio(
    lr: float, eta: float, clip: float | None
) -> None:
    w = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    w.grad = torch.randn(7, 2, dtype=torch.float64)
    w0, g = w.detach().clone(), w.grad.clone()
    phase = SigmoidPhase(alpha=0.5, decay=0.01, delay=10, floor=0.1)
    TVLARS([w], lr=lr, trust_coefficient=eta, norm_clip=clip, phase=phase).step()
    wn, gn = w0.norm().item(), g.norm().item()
    if clip is not None:
        wn, gn = min(wn, clip), min(gn, clip)
    expected = lr * phase(0) * eta * wn / gn * g.norm().item()
    assert math.isclose((w.detach() - w0).norm().item(), expected, rel_tol=1e-9)


def test_trust_ratio_handles_zero_norms() -> None:
    r = trust_ratio(torch.tensor([0.0, 2.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 4.0, 0.0]), 0.5)
    assert r.tolist() == [1.0, 1.0, 0.25, 1.0]
    clipped = trust_ratio(torch.tensor([20.0]), torch.tensor([40.0]), 1.0, norm_clip=10.0)
    assert clipped.tolist() == [1.0]


# ---------------------------------------------------------------- state and resume


def _train(opt: TVLARS, model: torch.nn.Module, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        x = torch.randn(8, 1, 8, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_resume_from_state_dict_continues_bit_for_bit(
    small_model: torch.nn.Module, foreach: bool
) -> None:
    phase = SigmoidPhase(decay=0.3, delay=4)
    straight = copy.deepcopy(small_model)
    opt = TVLARS(param_groups(straight, weight_decay=1e-3), lr=1.0, phase=phase, foreach=foreach)
    _train(opt, straight, 10)

    first = copy.deepcopy(small_model)
    opt1 = TVLARS(param_groups(first, weight_decay=1e-3), lr=1.0, phase=phase, foreach=foreach)
    _train(opt1, first, 4)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)  # how Lightning resumes

    resumed = copy.deepcopy(small_model)
    resumed.load_state_dict(ckpt["model"])
    opt2 = TVLARS(param_groups(resumed, weight_decay=1e-3), lr=1.0, phase=phase, foreach=foreach)
    assert opt2.step_count == 0
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.step_count == 4
    _train(opt2, resumed, 6, start=4)
    assert opt2.step_count == 10
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_counter_is_shared_by_groups_added_later() -> None:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = TVLARS([a], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    opt.add_param_group({"params": [b], "adapt": False})
    assert [g["step"] for g in opt.param_groups] == [1, 1]


def test_step_without_gradients_changes_nothing_but_counts() -> None:
    """A step() call is a step of the clock (as for Lightning's global_step), even with no
    gradient; its statistics describe it instead of repeating the previous step's."""
    w = torch.ones(3, requires_grad=True)
    opt = TVLARS([w], lr=0.1, phase=SigmoidPhase(decay=1.0, delay=0.0))
    w.grad = torch.ones(3)
    opt.step()
    w.grad = None
    before = w.detach().clone()
    opt.step()
    assert opt.step_count == 2
    stats = opt.last_step_stats
    assert stats is not None and stats.step == 1 and stats.params == ()
    assert bool(stats.skipped) and stats.phase == pytest.approx(1 / (1 + math.e))
    assert torch.equal(w.detach(), before)


def test_closure_runs_with_grad_enabled_and_returns_loss() -> None:
    w = torch.ones(3, requires_grad=True)
    opt = TVLARS([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 3.0
    assert opt.step_count == 1 and not torch.equal(w.detach(), torch.ones(3))


# ---------------------------------------------------------------- statistics


def test_last_step_stats_describe_the_step(small_model: torch.nn.Module) -> None:
    phase = SigmoidPhase(decay=0.5, delay=1)
    groups = param_groups(small_model, weight_decay=1e-2)
    opt = TVLARS(groups, lr=1.0, phase=phase)
    _train(opt, small_model, 2)
    stats = opt.last_step_stats
    assert stats is not None
    assert stats.step == 1 and stats.phase == phase(1)
    names = [n for g in groups for n in g["param_names"]]
    assert list(stats.names) == names
    assert stats.weight_norm.dtype == torch.float32 and stats.weight_norm.shape == (len(names),)
    adapted = torch.tensor(stats.adapted)
    assert torch.all(stats.trust_ratio[~adapted] == 1.0)
    assert torch.all(stats.trust_ratio[adapted] != 1.0)
    assert not stats.skipped
    # the weight norms were taken before the update of that step
    assert not torch.allclose(
        stats.weight_norm, torch.stack([p.detach().float().norm() for p in stats.params])
    )


def test_stats_do_not_keep_gradients_alive() -> None:
    import gc
    import weakref

    w = torch.ones(100, requires_grad=True)
    opt = TVLARS([w], lr=0.1, weight_decay=0.0)
    w.grad = g = torch.ones(100)
    ref = weakref.ref(g)
    opt.step()
    opt.zero_grad(set_to_none=True)
    del g
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------- host syncs


@pytest.mark.parametrize("foreach", [True, False])
def test_step_reads_no_device_value_on_the_host(
    small_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, foreach: bool
) -> None:
    opt = TVLARS(
        param_groups(small_model, weight_decay=1e-3),
        lr=1.0,
        phase=SigmoidPhase(decay=0.1),
        norm_clip=10.0,
        foreach=foreach,
    )
    small_model(torch.randn(8, 1, 8)).square().mean().backward()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host read of a device value inside step()")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    opt.step()
    monkeypatch.undo()
    assert opt.step_count == 2


# ---------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_whole_step(
    small_model: torch.nn.Module, foreach: bool, bad: float
) -> None:
    opt = TVLARS(param_groups(small_model, weight_decay=1e-3), lr=1.0, foreach=foreach)
    _train(opt, small_model, 2)
    before = {n: p.detach().clone() for n, p in small_model.named_parameters()}
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in small_model.parameters()]
    opt.zero_grad()
    small_model(torch.randn(8, 1, 8)).square().mean().backward()
    small_model[4].weight.grad[0, 0] = bad
    opt.step()
    assert bool(opt.last_step_stats.skipped)
    assert opt.step_count == 3
    for name, value in small_model.named_parameters():
        assert torch.equal(value, before[name]), name
    for p, buf in zip(small_model.parameters(), buffers, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    # the next finite step proceeds normally
    _train(opt, small_model, 1, start=7)
    assert not bool(opt.last_step_stats.skipped)
    assert all(torch.isfinite(p).all() for p in small_model.parameters())


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [True, False])
def test_low_precision_parameters_get_float32_norms(dtype: torch.dtype, foreach: bool) -> None:
    # 4096 elements of 300: the squared norm (3.7e8) overflows float16 but not float32
    w = torch.full((64, 64), 300.0, dtype=dtype, requires_grad=True)
    w.grad = torch.full((64, 64), 1.0, dtype=dtype)
    opt = TVLARS([w], lr=1.0, foreach=foreach)
    opt.step()
    stats = opt.last_step_stats
    assert stats.weight_norm.dtype == torch.float32
    torch.testing.assert_close(stats.weight_norm, torch.tensor([300.0 * 64]))
    assert not bool(stats.skipped)
    assert w.dtype == dtype and torch.isfinite(w).all()


# ---------------------------------------------------------------- the reference preset


def test_reference_preset_matches_the_authors_configuration(small_model: torch.nn.Module) -> None:
    opt = TVLARS.reference(small_model, lr=2.0, decay=1e-3)
    assert opt.phase == SigmoidPhase(alpha=0.1, decay=1e-3, delay=-1, floor=0)
    adapted, excluded = opt.param_groups
    assert adapted["adapt"] and adapted["weight_decay"] == 5e-4 and adapted["norm_clip"] == 10.0
    assert adapted["momentum"] == 0.9 and adapted["trust_coefficient"] == 1e-3
    assert not excluded["adapt"] and excluded["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in adapted["params"]) and all(
        p.ndim == 1 for p in excluded["params"]
    )
    from_tensors = TVLARS.reference(list(small_model.parameters()), lr=2.0, decay=1e-3)
    assert [len(g["params"]) for g in from_tensors.param_groups] == [3, 6]
    # the authors' float32 phi is exactly 0 once decay * (t + 1) > 88.7; ours (float64) is still
    # positive there and is exactly the floor only where exp overflows (decay * (t + 1) > 709.8)
    assert 0 < opt.phase(100_000) < 1e-40
    assert opt.phase(710_000) == 0.0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"momentum": -0.1}, "momentum=-0.1"),
        ({"weight_decay": -1e-4}, "weight_decay=-0.0001"),
        ({"trust_coefficient": 0.0}, "trust_coefficient=0.0"),
        ({"norm_clip": 0.0}, "norm_clip=0.0"),
        ({"norm_clip": -1.0}, "norm_clip=-1.0"),
        ({"foreach": "yes"}, "foreach='yes'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, fragment: str) -> None:
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match="is invalid") as err:
        TVLARS([torch.zeros(2, requires_grad=True)], **args)
    assert fragment in str(err.value)


def test_unknown_group_keys_are_carried_through_state_dict() -> None:
    """As in torch's optimizers: other libraries' keys (timm's lr_scale) travel untouched."""
    p = torch.zeros(2, requires_grad=True)
    opt = TVLARS([{"params": [p], "lr_scale": 0.5, "name": "head"}], lr=0.1)
    assert opt.param_groups[0]["lr_scale"] == 0.5
    fresh = TVLARS([{"params": [p]}], lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["lr_scale"] == 0.5 and fresh.param_groups[0]["name"] == "head"


def test_bad_group_values_and_types_are_refused() -> None:
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        TVLARS([{"params": [p], "momentum": 1.5}], lr=0.1)
    with pytest.raises(TypeError, match="adapt='no'"):
        TVLARS([{"params": [p], "adapt": "no"}], lr=0.1)
    with pytest.raises(TypeError, match="lr=True"):
        TVLARS([p], lr=True)
    with pytest.raises(TypeError, match="phase=3"):
        TVLARS([p], lr=0.1, phase=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_batches_and_pieces_of_big_tensors_match_the_reference(
    dtype: torch.dtype, weight_decay: float, momentum: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the multi-tensor path works batch by batch and cuts big tensors into pieces:
    with a tiny batch size every case (several batches, pieces, a 0-d tensor) is exact in
    float64 (the scale is multiplied) and within float32 rounding of the float64 reference in
    float32 (the fused kernel divides by its reciprocal)."""
    import lightning_tvlars.optim.workspace as update

    monkeypatch.setattr(update, "CPU_BATCH", 1000)
    shapes = [(40, 30), (7,), (3000,), (5, 5, 3, 3), (), (2500, 1), (10,)]
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours = [p.to(dtype).requires_grad_() for p in params]
    plain = [p.clone() for p in params]
    common = {"lr": 0.5, "momentum": momentum, "eta": 2e-2, "clip": None}
    opt = TVLARS(
        [{"params": ours[:5]}, {"params": ours[5:], "adapt": False}],
        lr=0.5,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=2e-2,
        phase=SigmoidPhase(*PHASE),
    )
    ref = PlainTVLARS(
        [
            {"params": plain[:5], "weight_decay": weight_decay, "adapt": True, **common},
            {"params": plain[5:], "weight_decay": weight_decay, "adapt": False, **common},
        ],
        PHASE,
    )
    for step in range(4):
        grads = _grads(params, step)
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.to(dtype)
        opt.step()
        ref.step({id(p): g for p, g in zip(plain, grads, strict=True)})
    assert max(len(layout.batches) for layout in opt._layouts.layouts()) > 2
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a.detach(), b.to(dtype), **tolerance)


@pytest.mark.parametrize("cpu_batch", [1000, 1 << 20], ids=["several-batches", "one-batch"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_a_step_leaves_the_gradients_as_they_were(
    weight_decay: float, cpu_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused kernel writes ``u / grad_scale`` back into the tensor it reads: on CPU that
    tensor must be the workspace, never the gradient, with and without weight decay."""
    import lightning_tvlars.optim.workspace as update

    monkeypatch.setattr(update, "CPU_BATCH", cpu_batch)
    params = [nn.Parameter(torch.randn(s)) for s in [(40, 30), (7,), (5, 5, 3, 3)]]
    opt = TVLARS(split_by_ndim(params, weight_decay), lr=0.5, phase=SigmoidPhase(*PHASE))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads, strict=True):
            assert torch.equal(p.grad, g)


def test_a_zero_phase_freezes_the_adapted_tensors_on_every_path() -> None:
    """phi = 0 makes the scale 0; on the CPU multi-tensor path the fused kernel divides by its
    reciprocal (inf), which must still give a zero update, as the multiply does."""
    weights = [torch.randn(6, 5), torch.randn(4, 3, 3, 3), torch.randn(7)]
    for foreach in (None, False):
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = TVLARS(split_by_ndim(params, 1e-2), lr=0.5, phase=lambda t: 0.0, foreach=foreach)
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        assert torch.equal(params[0].detach(), weights[0])
        assert torch.equal(params[1].detach(), weights[1])
        assert not torch.equal(params[2].detach(), weights[2])  # not adapted: plain SGD


@pytest.mark.parametrize("batched", [True, False], ids=["cpu-batches", "accelerator-path"])
def test_cached_plans_follow_what_changes_between_steps(
    batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split between the paths, the layouts and the workspaces are cached per group. Each
    change a run can make between two steps must rebuild them: a gradient with other strides, a
    parameter without a gradient, replaced storage, momentum buffers from a state dict or reset
    by hand, a group option that needs a workspace. Every step stays exact."""
    import lightning_tvlars.optim.workspace as update

    if batched:
        monkeypatch.setattr(update, "CPU_BATCH", 1000)  # (40, 30) is cut into pieces
    else:
        monkeypatch.setattr(update, "BATCHED_DEVICES", frozenset())
    params = [torch.randn(s, dtype=torch.float64) for s in [(40, 30), (3,), (5, 6)]]
    ours = [p.clone().requires_grad_() for p in params]
    plain = [p.clone() for p in params]
    opt = TVLARS(
        [{"params": [ours[0], ours[2]]}, {"params": [ours[1]], "adapt": False, "weight_decay": 0}],
        lr=0.5,
        weight_decay=1e-2,
        trust_coefficient=2e-2,
        phase=SigmoidPhase(*PHASE),
    )
    common = {"lr": 0.5, "momentum": 0.9, "eta": 2e-2, "clip": None}
    ref = PlainTVLARS(
        [
            {"params": [plain[0], plain[2]], "weight_decay": 1e-2, "adapt": True, **common},
            {"params": [plain[1]], "weight_decay": 0.0, "adapt": False, **common},
        ],
        PHASE,
    )

    def column_major(g: torch.Tensor) -> torch.Tensor:
        return g.t().contiguous().t()

    # Every change comes after a step without one, so that it alone can trigger the rebuild.
    for step in range(13):
        gen = torch.Generator().manual_seed(200 + step)
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        given = dict(enumerate(grads))
        if step == 2:
            given[0] = column_major(grads[0])
        if step == 4:
            del given[2]
        if step == 6:
            ours[0].data = ours[0].data.clone()
        if step == 7:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if step == 9:
            opt.state.clear()  # momentum reset by hand: new buffers
            ref.buffers.clear()
        if step == 11:
            opt.param_groups[1]["weight_decay"] = ref.groups[1]["weight_decay"] = 1e-2
        for i, p in enumerate(ours):
            p.grad = given[i].clone() if i in given else None
        opt.step()
        ref.step({id(plain[i]): grads[i] for i in given})
        for a, b in zip(ours, plain, strict=True):
            torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12, msg=f"step {step}")
            torch.testing.assert_close(  # the buffers the state dict saves are the ones updated
                opt.state[a]["momentum_buffer"], ref.buffers[id(b)], rtol=1e-10, atol=1e-12
            )


def test_a_plan_is_not_reused_for_another_tensor_at_a_recycled_address() -> None:
    """Storage swapped out of a parameter the plan holds can come back as another parameter's,
    at the same address, size and strides: the plan must not update the old parameter."""
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = TVLARS([p], lr=0.5, momentum=0.0, weight_decay=1e-2)  # no buffers in the key
    p.grad = torch.randn_like(p)
    opt.step()
    old = p.data
    p.data = torch.zeros(1, dtype=torch.float64)
    q = nn.Parameter(old)  # same address, size and strides as p had
    opt.param_groups[0]["params"] = [q]
    q.grad = torch.randn_like(q)
    expected = q.detach().clone()
    common = {"lr": 0.5, "momentum": 0.0, "weight_decay": 1e-2, "eta": 1e-3, "clip": None}
    PlainTVLARS([{"params": [expected], "adapt": True, **common}], None).step(
        {id(expected): q.grad}
    )
    opt.step()
    torch.testing.assert_close(q.detach(), expected, rtol=1e-12, atol=0)
    assert p.detach().tolist() == [0.0]


def test_plans_of_groups_that_leave_the_step_are_dropped() -> None:
    """A removed group, a frozen one and one switched to the elementwise path release the
    tensors and the workspace their plan held."""
    import gc
    import weakref

    params = [nn.Parameter(torch.randn(6, 5)) for _ in range(4)]
    opt = TVLARS([{"params": [p]} for p in params], lr=0.1)

    def step() -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if group.get("frozen") is None:
                    p.grad = torch.randn_like(p)
        opt.step()

    step()
    assert len(opt._layouts.layouts()) == 4
    removed = weakref.ref(params[3])
    opt.state.pop(opt.param_groups.pop()["params"][0])  # torch.optim keeps state by parameter
    del params[3]
    opt.param_groups[2]["foreach"] = False
    opt.param_groups[1]["frozen"] = True
    params[1].grad = None
    step()
    gc.collect()
    assert removed() is None
    assert [layout.batches[0].weights[0] for layout in opt._layouts.layouts()] == [params[0]]


def test_buffers_of_another_dtype_take_the_elementwise_path() -> None:
    """Weights cast after some steps (``model.to(dtype)``) keep buffers of the old dtype, which
    the fused kernel cannot take: the step must match the elementwise path."""
    torch.manual_seed(0)
    params = [torch.randn(5, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    runs = []
    for foreach in (None, False):
        ws = [nn.Parameter(p.clone()) for p in params]
        opt = TVLARS(split_by_ndim(ws, 1e-2), lr=0.5, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            if step == 2:
                for w in ws:
                    w.data = w.data.float()
            for w in ws:
                w.grad = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype)
            opt.step()
        assert all(opt.state[w]["momentum_buffer"].dtype == torch.float64 for w in ws)
        runs.append(ws)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("phase", [True, False])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_accelerator_path_matches_the_reference_on_cpu(
    phase: bool, clip: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPUs take the multi-tensor path without CPU batching (u kept in the block workspace,
    per-block scale): run that path here, where the reference can check it."""
    import lightning_tvlars.optim.workspace as update

    monkeypatch.setattr(update, "BATCHED_DEVICES", frozenset())
    ours, plain = _run_pair(True, phase, clip)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
