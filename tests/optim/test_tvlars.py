"""What only TVLARS has: its rule's corner cases, Nesterov momentum and the authors' preset.

The generic contract (layouts, copies, resume, AMP, schedulers, host reads...) is in
``test_contract.py`` for every optimizer of the family.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_impl import PlainTVLARS
from torch import nn

from lightning_tvlars import TVLARS, SigmoidPhase
from lightning_tvlars.optim import trust_ratio
from lightning_tvlars.optim.groups import split_by_ndim

pytestmark = pytest.mark.optim

PHASE = (1.0, 0.3, 2.0, 0.05)  # alpha, decay, delay, floor: phi changes a lot over 6 steps
FOREACH = pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "forloop"])


def _run_pair(foreach: bool | None, phase: bool, clip: float | None, nesterov: bool = False):
    """Per-group options, a zero weight tensor (||w|| = 0) and a zero gradient without decay
    (||u|| = 0), against the oracle."""
    shapes = [(4, 3), (3,), (2, 2, 3), (5,), (6, 1)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params[2].zero_()
    ours = [p.clone().requires_grad_() for p in params]
    plain = [p.clone() for p in params]
    spec = [  # (indices, lr, momentum, weight_decay, eta, adapt)
        ([0, 2], 0.5, 0.9, 1e-2, 2e-2, True),
        ([1, 3], 0.1, 0.8, 0.0, 1.0, False),
        ([4], 0.3, 0.5, 0.0, 5e-2, True),
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
        nesterov=nesterov,
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
                "nesterov": nesterov,
            }
            for idx, lr, m, wd, eta, adapt in spec
        ],
        PHASE if phase else None,
    )
    for step in range(6):
        gen = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        grads[4].zero_()
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step({id(p): g for p, g in zip(plain, grads, strict=True)})
    return ours, plain


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("phase", [True, False])
@FOREACH
def test_the_rule_with_clip_zero_norms_and_nesterov_matches_the_oracle(
    foreach: bool | None, phase: bool, clip: float | None, nesterov: bool
) -> None:
    ours, plain = _run_pair(foreach, phase, clip, nesterov)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
    # the zero weight tensor moved: r = 1 there, so it is not frozen at zero
    assert ours[2].detach().abs().sum() > 0


@pytest.mark.parametrize("nesterov", [False, True])
@FOREACH
def test_phase_none_is_lars_and_adapt_false_is_torch_momentum_sgd(
    foreach: bool | None, nesterov: bool
) -> None:
    w = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    sgd_b = b.detach().clone().requires_grad_()
    opt = TVLARS(
        [{"params": [w]}, {"params": [b], "adapt": False}],
        lr=0.1,
        momentum=0.9,
        nesterov=nesterov,
        foreach=foreach,
    )
    sgd = torch.optim.SGD([sgd_b], lr=0.1, momentum=0.9, nesterov=nesterov)
    w0 = w.detach().clone()
    g = torch.randn(5, 4)
    for step in range(3):
        w.grad, b.grad, sgd_b.grad = g, torch.full((4,), step + 1.0), torch.full((4,), step + 1.0)
        opt.step()
        sgd.step()
        if step == 0:  # b = r g; the step is b, or r g + 0.9 b with Nesterov
            r = 1e-3 * w0.norm() / g.norm()
            expected = w0 - 0.1 * r * g * (1.9 if nesterov else 1.0)
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


def test_trust_ratio_handles_zero_norms_clips_and_bounds() -> None:
    r = trust_ratio(torch.tensor([0.0, 2.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 4.0, 0.0]), 0.5)
    assert r.tolist() == [1.0, 1.0, 0.25, 1.0]
    clipped = trust_ratio(torch.tensor([20.0]), torch.tensor([40.0]), 1.0, norm_clip=10.0)
    assert clipped.tolist() == [1.0]
    bounded = trust_ratio(torch.tensor([8.0, 1.0]), torch.tensor([2.0, 4.0]), max_ratio=1.0)
    assert bounded.tolist() == [1.0, 0.25]


@FOREACH
def test_zero_dim_tensors_in_an_adapted_group_get_the_trust_ratio(foreach: bool | None) -> None:
    w = nn.Parameter(torch.tensor(2.0))
    w.grad = torch.tensor(4.0)
    opt = TVLARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.1, foreach=foreach)
    opt.step()
    # u = 4, r = 0.1 * 2 / 4 = 0.05: w = 2 - 0.05 * 4 = 1.8 (plain SGD would give -2)
    torch.testing.assert_close(w.detach(), torch.tensor(1.8))
    assert opt.last_step_stats.adapted == (True,)


# ---------------------------------------------------------------- the authors' preset


def test_reference_preset_matches_the_authors_configuration(small_model: nn.Module) -> None:
    opt = TVLARS.reference(small_model, lr=2.0, decay=1e-3)
    assert opt.phase == SigmoidPhase(alpha=0.1, decay=1e-3, delay=-1, floor=0)
    adapted, excluded = opt.param_groups
    assert adapted["adapt"] and adapted["weight_decay"] == 5e-4 and adapted["norm_clip"] == 10.0
    assert adapted["momentum"] == 0.9 and adapted["trust_coefficient"] == 1e-3
    assert not excluded["adapt"] and excluded["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in adapted["params"])
    assert all(p.ndim == 1 for p in excluded["params"])
    from_tensors = TVLARS.reference(list(small_model.parameters()), lr=2.0, decay=1e-3)
    assert [len(g["params"]) for g in from_tensors.param_groups] == [3, 6]
    # the authors' float32 phi is exactly 0 once decay * (t + 1) > 88.7; ours (float64) is still
    # positive there and is exactly the floor only where exp overflows (decay * (t + 1) > 709.8)
    assert 0 < opt.phase(100_000) < 1e-40
    assert opt.phase(710_000) == 0.0


def test_reference_preset_overrides_apply_to_every_group(small_model: nn.Module) -> None:
    opt = TVLARS.reference(small_model, lr=1.0, decay=1e-3, weight_decay=0.0, momentum=0.5)
    assert len(opt.param_groups) == 2
    assert all(g["weight_decay"] == 0.0 and g["momentum"] == 0.5 for g in opt.param_groups)
    tensors = list(small_model.parameters())
    from_tensors = TVLARS.reference(tensors, lr=1.0, decay=1e-3, weight_decay=0.0)
    assert all(g["weight_decay"] == 0.0 for g in from_tensors.param_groups)
    default = TVLARS.reference(small_model, lr=1.0, decay=1e-3)
    assert [g["weight_decay"] for g in default.param_groups] == [5e-4, 0.0]


def test_split_by_ndim_adapts_and_decays_zero_dim_tensors() -> None:
    matrix, vector, scalar = torch.zeros(2, 2), torch.zeros(3), torch.zeros(())
    groups = split_by_ndim([matrix, vector, scalar], 1e-3)
    adapted = [p for g in groups if g["adapt"] for p in g["params"]]
    excluded = [p for g in groups if not g["adapt"] for p in g["params"]]
    assert [id(p) for p in adapted] == [id(matrix), id(scalar)]
    assert [id(p) for p in excluded] == [id(vector)]
    assert all(g["weight_decay"] == (1e-3 if g["adapt"] else 0.0) for g in groups)
