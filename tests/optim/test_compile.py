"""torch.compile(optimizer.step, fullgraph=True): no graph break, same result as eager."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_tvlars import LAMB, TVLARS, SigmoidPhase, param_groups

pytestmark = pytest.mark.timeout(240)

BUILD = {
    "TVLARS": lambda groups, phase: TVLARS(groups, lr=2.0, norm_clip=10.0, phase=phase),
    "LAMB": lambda groups, phase: LAMB(groups, lr=0.05, max_grad_norm=1.0, phase=phase),
}


@pytest.mark.parametrize("name", list(BUILD))
def test_compiled_step_matches_eager(name: str) -> None:
    # No bias right before a normalization: its gradient is rounding noise, which Adam's
    # normalization turns into steps of size lr in random directions (chaos, not a bug).
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 5),
        torch.nn.LayerNorm(5),
        torch.nn.Linear(5, 3, bias=False),
    )
    torch._dynamo.reset()
    models = [model, copy.deepcopy(model)]
    opts = [
        BUILD[name](param_groups(m, weight_decay=1e-3), SigmoidPhase(decay=0.3, delay=2))
        for m in models
    ]
    compiled = torch.compile(opts[1].step, fullgraph=True)
    x = torch.randn(16, 1, 8)
    for _ in range(4):
        for model, opt, step in zip(models, opts, (opts[0].step, compiled), strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opts[1].step_count == 4
    stats = opts[1].last_step_stats
    assert float(stats.phase) == pytest.approx(SigmoidPhase(decay=0.3, delay=2)(3), rel=1e-6)


def test_phase_tensor_matches_the_float_and_never_overflows() -> None:
    phase = SigmoidPhase(alpha=0.5, decay=0.01, delay=100, floor=0.1)
    steps = torch.tensor([0, 50, 100, 10_000, 10**9])
    values = phase.tensor(steps)
    expected = torch.tensor([phase(int(t)) for t in steps], dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=0.0)  # float64 on the device
    assert values[-1].item() == 0.1 and torch.isfinite(values).all()  # exactly the floor
