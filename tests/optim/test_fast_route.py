"""Every multi-tensor call of the default GPU path meets ATen's fast-route conditions.

On CUDA, ATen's ``_foreach_*`` kernels (and the fused optimizer kernels built on the same
``multi_tensor_apply``) run as a few launches for a whole list only when every list holds tensors
of one device and dtype, each dense (non-overlapping, no gaps), and paired tensors have equal
sizes and strides; otherwise they fall back to one kernel per tensor. These conditions are
checked here on CPU, on the calls the multi-tensor path dispatches, so that the number of CUDA
kernels per step cannot grow with the number of tensors without a test failing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tvlars import LAMB, TVLARS, SigmoidPhase, param_groups
from lightning_tvlars.optim import workspace as update
from lightning_tvlars.optim.workspace import is_dense

MULTI_TENSOR_OPS = ("_foreach_", "_fused_sgd", "_fused_adam")


class MultiTensorCalls(TorchDispatchMode):
    """Records every multi-tensor call and counts all dispatched operators."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[list[Tensor]], list[Tensor]]] = []
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.total += 1
        name = str(func.overloadpacket).split(".")[-1]
        if name.startswith(MULTI_TENSOR_OPS):
            values = [*args, *(kwargs or {}).values()]
            lists = [list(a) for a in values if isinstance(a, list | tuple) and a]
            lists = [a for a in lists if all(isinstance(t, Tensor) for t in a)]
            scalars = [a for a in values if isinstance(a, Tensor)]
            self.calls.append((name, lists, scalars))
        return func(*args, **(kwargs or {}))


def fast_route_violations(calls: list[tuple[str, list[list[Tensor]], list[Tensor]]]) -> list[str]:
    problems = []
    for name, lists, scalars in calls:
        devices = {t.device for tensors in lists for t in tensors} | {s.device for s in scalars}
        if len(devices) > 1:
            problems.append(f"{name}: several devices {devices}")
        for k, tensors in enumerate(lists):
            if len({t.dtype for t in tensors}) > 1:
                problems.append(f"{name}: list {k} mixes dtypes")
            if not all(is_dense(t) for t in tensors):
                problems.append(f"{name}: list {k} holds a tensor with gaps or overlaps")
        if name.startswith("_fused_adam"):  # the per-tensor step counts are read as scalars
            lists = [a for a in lists if not all(t.dim() == 0 for t in a)] or lists
        first = lists[0]
        for k, other in enumerate(lists[1:], 1):
            if len(other) != len(first) or any(
                a.shape != b.shape or a.stride() != b.stride()
                for a, b in zip(first, other, strict=True)
            ):
                problems.append(f"{name}: list {k} is not paired size for size with list 0")
    return problems


def _model(layers: int) -> nn.Module:
    blocks: list[nn.Module] = [nn.Conv2d(3, 8, 3)]
    for _ in range(layers):
        blocks += [nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).to(
        memory_format=torch.channels_last
    )


OPTIMIZERS = {"TVLARS": TVLARS, "LAMB": LAMB}
EACH = pytest.mark.parametrize("name", list(OPTIMIZERS))


def _record(name: str, layers: int, phase: SigmoidPhase | None) -> MultiTensorCalls:
    """Calls of the second step of the accelerators' multi-tensor path, run here on CPU."""
    torch.manual_seed(0)
    model = _model(layers)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    groups = param_groups(model, weight_decay=5e-4)
    opt = OPTIMIZERS[name](groups, lr=1.0, phase=phase, foreach=True)
    for _ in range(2):  # the second step: state exists, as in training
        opt.zero_grad()
        model(x).square().mean().backward()
        recorder = MultiTensorCalls()
        with recorder:
            opt.step()
    return recorder


@pytest.fixture(autouse=True)
def _accelerator_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU runs its own cache-blocked variant; these tests are about the accelerators' path."""
    monkeypatch.setattr(update, "BATCHED_DEVICES", frozenset())


@pytest.mark.parametrize("phase", [SigmoidPhase(decay=0.1, delay=5), None])
@EACH
def test_every_multi_tensor_call_is_on_the_fast_route(
    name: str, phase: SigmoidPhase | None
) -> None:
    recorder = _record(name, 8, phase)
    names = {call for call, _, _ in recorder.calls}
    assert {"_foreach_norm", "_fused_sgd_"} <= names  # the path under test really ran
    if name == "LAMB":
        assert "_fused_adam_" in names
    assert fast_route_violations(recorder.calls) == []


@EACH
def test_operator_count_does_not_grow_with_the_number_of_layers(name: str) -> None:
    phase = SigmoidPhase(decay=0.1, delay=5)
    assert _record(name, 8, phase).total == _record(name, 32, phase).total


def test_the_checker_catches_the_old_per_tensor_scale() -> None:
    """Negative control: 0-d factors paired with N-d updates (0.1.0's scaling) are caught."""
    updates = [torch.randn(3, 4), torch.randn(5)]
    recorder = MultiTensorCalls()
    with recorder:
        torch._foreach_mul_(updates, torch.rand(2).unbind())
    assert fast_route_violations(recorder.calls)
