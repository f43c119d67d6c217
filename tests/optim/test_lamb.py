"""What only LAMB has: parity with timm's ``Lamb``, its options, the global clip, the update
counts of its bias correction, and the phase (time-varying LAMB).

The generic contract (layouts, copies, resume, AMP, schedulers, host reads...) is in
``test_contract.py`` for every optimizer of the family; the float64 oracle is
``reference_impl.PlainLAMB``.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from optimizers import LAMB_INFO, params_of, set_grads
from torch import nn

from lightning_tvlars import LAMB, SigmoidPhase, param_groups
from lightning_tvlars.optim import workspace
from lightning_tvlars.phase import ConstantPhase

pytestmark = pytest.mark.optim

timm_optim = pytest.importorskip("timm.optim")

SHAPES = [(40, 30), (7,), (3000,), (5, 5, 3, 3), (), (2500, 1), (10,)]
OPTIONS = [
    dict(
        zip(("max_grad_norm", "trust_clip", "decoupled_decay", "always_adapt"), combo, strict=True)
    )
    for combo in itertools.product([None, 1.0], [False, True], [False, True], [False, True])
]


def _timm_pair(dtype: torch.dtype, options: dict, foreach: bool | None, steps: int = 5):
    """timm's Lamb and ours on the same tensors and gradients: an adapted group with weight
    decay and a group without (adapted only with always_adapt, as timm decides)."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    runs = []
    for make in (
        lambda groups: timm_optim.Lamb(groups, lr=0.01, **options),
        lambda groups: LAMB(groups, lr=0.01, foreach=foreach, **options),
    ):
        params = [nn.Parameter(w.clone()) for w in start]
        opt = make(
            [
                {"params": params[:4], "weight_decay": 0.02},
                {"params": params[4:], "weight_decay": 0.0},
            ]
        )
        for step in range(steps):
            set_grads(params, step)
            opt.step()
        runs.append(params)
    return runs


@pytest.mark.parametrize("cpu_batch", [1000, 1 << 20], ids=["pieces", "one-batch"])
@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "forloop"])
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_float64_steps_equal_timms_lamb(
    options: dict, foreach: bool | None, cpu_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workspace, "CPU_BATCH", cpu_batch)
    timm_params, ours = _timm_pair(torch.float64, options, foreach)
    for a, b in zip(ours, timm_params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "forloop"])
@pytest.mark.parametrize(
    "options", OPTIONS[::5], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_float32_steps_match_timms_lamb(options: dict, foreach: bool | None) -> None:
    timm_params, ours = _timm_pair(torch.float32, options, foreach)
    for a, b in zip(ours, timm_params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"grad_averaging": False}, {"bias_correction": False}],
    ids=["no-grad-averaging", "no-bias-correction"],
)
def test_the_elementwise_options_equal_timms_lamb(options: dict) -> None:
    """``grad_averaging=False`` and ``bias_correction=False`` take the elementwise path."""
    timm_params, ours = _timm_pair(torch.float64, {"max_grad_norm": 1.0, **options}, None)
    for a, b in zip(ours, timm_params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


def test_defaults_are_timms() -> None:
    import inspect

    ours = inspect.signature(LAMB).parameters
    theirs = inspect.signature(timm_optim.Lamb).parameters
    shared = [name for name in theirs if name in ours and name != "params"]
    assert len(shared) >= 10
    for name in shared:
        assert ours[name].default == theirs[name].default, name


def test_adaptation_follows_timms_rule_unless_a_group_says() -> None:
    w, b, c = (
        nn.Parameter(torch.randn(3, 2)),
        nn.Parameter(torch.randn(2)),
        nn.Parameter(torch.randn(2)),
    )
    opt = LAMB(
        [
            {"params": [w]},
            {"params": [b], "weight_decay": 0.0},
            {"params": [c], "weight_decay": 0.0, "adapt": True},
        ]
    )
    set_grads([w, b, c], 0)
    opt.step()
    assert opt.last_step_stats.adapted == (True, False, True)
    opt = LAMB(
        [{"params": [b], "weight_decay": 0.0}, {"params": [w], "adapt": False}], always_adapt=True
    )
    set_grads([b, w], 0)
    opt.step()
    assert opt.last_step_stats.adapted == (True, False)  # always_adapt fills the default only


def test_the_package_groups_keep_biases_and_norms_out() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = LAMB(param_groups(model, weight_decay=0.01))
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    assert dict(zip(opt.last_step_stats.names, opt.last_step_stats.adapted, strict=True)) == {
        "0.weight": True,
        "0.bias": False,
        "1.weight": False,
        "1.bias": False,
    }


def test_group_options_it_cannot_follow_are_refused() -> None:
    w = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(
        ValueError, match=r"max_grad_norm=0\.5 in a group is invalid: the clip is global"
    ):
        LAMB([{"params": [w], "max_grad_norm": 0.5}])
    with pytest.raises(ValueError, match=r"momentum=0\.9 is not supported by LAMB"):
        LAMB([{"params": [w], "momentum": 0.9}])
    with pytest.raises(ValueError, match="nesterov=True is not supported by LAMB"):
        LAMB([{"params": [w], "nesterov": True}])
    with pytest.raises(TypeError, match=r"betas=0\.9 is invalid: expected a pair"):
        LAMB([w], betas=0.9)  # type: ignore[arg-type]


def test_the_clip_is_global_over_all_groups() -> None:
    """Gradients 10x larger in one group shrink the other group's step too (timm's clip)."""
    a, b = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(4, 4))
    moves = []
    for scale in (1.0, 10.0):
        x, y = copy.deepcopy(a), copy.deepcopy(b)
        opt = LAMB([{"params": [x]}, {"params": [y]}], lr=0.1, weight_decay=0.0, max_grad_norm=1.0)
        x.grad, y.grad = torch.full((4, 4), 0.5), torch.full((4, 4), 0.5 * scale)
        opt.step()
        x.grad, y.grad = torch.full((4, 4), 0.5), torch.full((4, 4), 0.5)
        opt.step()  # the second step's moments still carry the first step's clip
        moves.append(float((x.detach() - 1).abs().max()))
    assert moves[1] < moves[0]


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "forloop"])
def test_a_skipped_step_leaves_the_update_counts_of_the_bias_correction(
    foreach: bool | None,
) -> None:
    """After a skipped step, the moments and their update count are those of a run that never
    took it: bias correction divides by 1 - beta^k with k the updates really taken."""
    runs = []
    for skip in (False, True):
        params = [nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)))]
        opt = LAMB(params, lr=0.01, foreach=foreach)
        schedule = [0, 1, "inf", 2, 3] if skip else [0, 1, 2, 3]
        for step in schedule:
            if step == "inf":
                params[0].grad = torch.full((6, 4), float("inf"))
            else:
                set_grads(params, int(step))
            opt.step()
        assert float(opt.state[params[0]]["step"]) == 4.0
        runs.append(params[0])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "forloop"])
def test_the_phase_multiplies_the_trust_ratio_of_adapted_tensors(foreach: bool | None) -> None:
    """Time-varying LAMB: on the first step an adapted tensor moves phi times as far as without
    a phase, an excluded one as far."""
    moves = {}
    for phi in (1.0, 0.25):
        params = [nn.Parameter(torch.ones(5, 3)), nn.Parameter(torch.ones(3))]
        opt = LAMB(
            [{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:], "adapt": False}],
            lr=0.1,
            phase=ConstantPhase(phi),
            foreach=foreach,
        )
        set_grads(params, 0)
        opt.step()
        moves[phi] = [p.detach() - 1 for p in params]
    torch.testing.assert_close(moves[0.25][0], 0.25 * moves[1.0][0])
    torch.testing.assert_close(moves[0.25][1], moves[1.0][1])


def test_a_sigmoid_phase_follows_the_step_clock() -> None:
    opt = LAMB_INFO.build(param_groups(nn.Linear(3, 2), weight_decay=0.01), phased=True)
    phase = SigmoidPhase(decay=0.3, delay=2.0)
    for step in range(4):
        set_grads(params_of(opt), step)
        opt.step()
        assert opt.last_step_stats.phase == phase(step)
