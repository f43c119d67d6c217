"""The family on a CUDA device: exactness, no host sync, kernel counts, AMP, two devices, compile.

Skipped where there is no GPU (CI has none); run on a GPU machine with
``python -m pytest tests/optim/test_cuda.py``. ``LIGHTNING_TVLARS_TEST_DEVICE=cpu`` runs the
device-independent checks on CPU (used to check this file itself).
"""

from __future__ import annotations

import os

import pytest
import torch
from reference_impl import PlainTVLARS
from torch import nn

from lightning_tvlars import LAMB, TVLARS, SigmoidPhase, TVLARSScheduler, param_groups
from lightning_tvlars.schedule import FittedPhase

DEVICE = os.environ.get("LIGHTNING_TVLARS_TEST_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(
    CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"
)
PHASE = (1.0, 0.3, 2.0, 0.05)


def _layouts(device: str) -> dict[str, torch.Tensor]:
    base = torch.randn(10, 5, 2, device=device)
    flat = torch.randn(30, device=device)
    return {
        "contiguous": torch.randn(4, 3, device=device),
        "gaps": base[..., 0],
        "transposed": torch.randn(3, 4, device=device).t(),
        "channels_last": torch.randn(2, 3, 4, 4, device=device).to(
            memory_format=torch.channels_last
        ),
        "view_a": flat[:12].view(3, 4),
        "view_b": flat[12:].view(6, 3),
        "zero_d": torch.tensor(1.5, device=device),
        "bias": torch.randn(7, device=device),
    }


@pytest.mark.parametrize("foreach", [None, False])
def test_every_layout_matches_the_float64_reference(foreach: bool | None) -> None:
    torch.manual_seed(0)
    tensors = _layouts(DEVICE)
    ours = [nn.Parameter(t) for t in tensors.values()]
    plain = [t.detach().double().cpu().clone() for t in tensors.values()]
    opt = TVLARS(
        [{"params": ours[:-1]}, {"params": ours[-1:], "adapt": False, "weight_decay": 0.0}],
        lr=0.5,
        weight_decay=1e-2,
        trust_coefficient=2e-2,
        phase=SigmoidPhase(*PHASE),
        foreach=foreach,
    )
    common = {"lr": 0.5, "momentum": 0.9, "eta": 2e-2, "clip": None}
    ref = PlainTVLARS(
        [
            {"params": plain[:-1], "weight_decay": 1e-2, "adapt": True, **common},
            {"params": plain[-1:], "weight_decay": 0.0, "adapt": False, **common},
        ],
        PHASE,
    )
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.to(DEVICE)
        opt.step()
        ref.step({id(r): g.double() for r, g in zip(plain, grads, strict=True)})
    for p, r in zip(ours, plain, strict=True):
        torch.testing.assert_close(p.detach().double().cpu(), r, rtol=2e-5, atol=2e-6)


def _stack(layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(256, 256), nn.LayerNorm(256), nn.ReLU()]
    return nn.Sequential(*blocks).to(DEVICE)


def _step_once(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(32, 256, device=DEVICE)).square().mean().backward()


#: The family with a phase, as the kernel-count and no-sync tests build it (LAMB with its default
#: global gradient clip: one more multi-tensor pass).
FAMILY = {
    "TVLARS": lambda groups: TVLARS(groups, lr=1.0, phase=SigmoidPhase()),
    "LAMB": lambda groups: LAMB(groups, lr=1e-2, phase=SigmoidPhase()),
}
#: Most kernels 96 more tensors (8 -> 32 layers) may add. ATen's multi_tensor_apply starts one
#: more launch when its argument list fills up (every 36-110 tensors, by the number of lists), as
#: for torch's own foreach optimizers: TVLARS's few multi-tensor calls add at most 4 (measured);
#: LAMB makes about 20 per step, which add about 12-15. One call falling back to a kernel per
#: tensor would add 96 on its own.
KERNEL_GROWTH = {"TVLARS": 4, "LAMB": 24}


@pytest.mark.skipif(not CUDA, reason="counts CUDA kernels")
@pytest.mark.parametrize("name", list(FAMILY))
def test_kernel_count_does_not_grow_with_the_number_of_layers(name: str) -> None:
    from lightning_tvlars.bench.step import count_kernels

    counts = []
    for layers in (8, 32):
        model = _stack(layers)
        opt = FAMILY[name](param_groups(model, weight_decay=5e-4))
        _step_once(model, opt)
        opt.step()
        _step_once(model, opt)
        counts.append(count_kernels(opt.step))
    assert counts[1] <= counts[0] + KERNEL_GROWTH[name], counts


@pytest.mark.skipif(not CUDA, reason="CUDA sync debug mode")
@pytest.mark.parametrize("name", list(FAMILY))
def test_grad_scaler_step_does_not_sync_and_skips_an_overflow(name: str) -> None:
    model = _stack(4)
    opt = FAMILY[name](param_groups(model, weight_decay=5e-4))
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for step in range(4):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(32, 256, device=DEVICE)).float().square().mean()
        scaler.scale(loss * (float("inf") if step == 2 else 1.0)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert unchanged == (step == 2)
    assert opt.step_count == 4 and scaler.get_scale() < 2.0**12


def test_a_model_on_two_devices_steps_every_part_and_skips_together() -> None:
    devices = ("cpu", "cuda") if CUDA else ("cpu", "cpu")
    first, second = nn.Linear(6, 8).to(devices[0]), nn.Linear(8, 2).to(devices[1])
    opt = TVLARS(
        [*param_groups(first, weight_decay=1e-3), *param_groups(second, weight_decay=1e-3)],
        lr=1.0,
        phase=SigmoidPhase(*PHASE),
    )
    for step in range(3):
        opt.zero_grad()
        x = torch.randn(16, 6, device=devices[0])
        out = second(torch.tanh(first(x)).to(devices[1]))
        out.square().mean().backward()
        if step == 1:
            first.weight.grad[0, 0] = float("nan")  # on the first device only
        before = [p.detach().clone() for p in [*first.parameters(), *second.parameters()]]
        opt.step()
        after = [*first.parameters(), *second.parameters()]
        moved = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
        assert all(moved) if step != 1 else not any(moved), (step, moved)


@pytest.mark.skipif(not CUDA, reason="a compiled CUDA step")
def test_compiled_step_matches_eager() -> None:
    models = [_stack(2), _stack(2)]
    opts = [
        TVLARS(param_groups(m, weight_decay=5e-4), lr=1.0, phase=SigmoidPhase(decay=0.2))
        for m in models
    ]
    compiled = torch.compile(opts[1].step, fullgraph=True)
    for _step in range(4):
        x = torch.randn(32, 256, device=DEVICE)
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
        opts[0].step()
        compiled()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- capturable (#27)

GRAPHED = {
    "TVLARS": lambda groups, cap: TVLARS(groups, lr=1.0, nesterov=True, capturable=cap),
    "LAMB": lambda groups, cap: LAMB(groups, lr=1e-2, max_grad_norm=1.0, capturable=cap),
}
SCHEDULE = {"total_steps": 12, "warmup_fraction": 0.25, "lr_schedule": "cosine"}


class _Twins:
    """The same model and schedule twice: the eager float path, and a capturable copy whose
    gradients stay where they are (a CUDA graph reads them there)."""

    def __init__(self, name: str) -> None:
        self.models = [_stack(2), _stack(2)]
        self.opts = [
            GRAPHED[name](param_groups(m, weight_decay=5e-4), cap)
            for m, cap in zip(self.models, (False, True), strict=True)
        ]
        self.scheds = [TVLARSScheduler(o, phase=FittedPhase(), **SCHEDULE) for o in self.opts]
        self.params = [list(m.parameters()) for m in self.models]
        for ps in self.params:
            for p in ps:
                p.grad = torch.zeros_like(p)

    def load(self, step: int) -> None:
        gen = torch.Generator(device=DEVICE).manual_seed(step)
        grads = [torch.randn(p.shape, generator=gen, device=DEVICE) * 1e-2 for p in self.params[0]]
        for ps in self.params:
            for p, g in zip(ps, grads, strict=True):
                p.grad.copy_(g)

    def eager_step(self, index: int) -> None:
        self.opts[index].step()
        self.scheds[index].step()

    def check(self, steps: int, rtol: float = 1e-5) -> None:
        """The same weights (float32 rounding: the fused kernels read a float32 rate tensor
        where the float path passes a double), t, phi(t) and the scheduled rate."""
        torch.cuda.synchronize()
        for a, b in zip(*self.params, strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6)
        held = self.opts[1]
        assert held.step_count == steps == self.opts[0].step_count
        stats = held.last_step_stats
        phase = self.scheds[0].plan.phase
        assert float(stats.phase) == pytest.approx(phase(steps - 1), rel=1e-12)
        rate = self.scheds[0].applied_lr(steps - 1)
        assert float(stats.lr[0]) == pytest.approx(rate, rel=1e-6)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
@pytest.mark.parametrize("name", list(GRAPHED))
def test_a_step_captured_in_a_cuda_graph_replays_as_the_eager_step(name: str) -> None:
    """The whole capturable step in one ``torch.cuda.graph``, replayed while the scheduler
    writes a new rate (warm-up, cosine) between replays and phi advances on the device: the
    same weights, t, phi and rates as the eager float path."""
    twins = _Twins(name)
    side = torch.cuda.Stream()  # torch's rule: warm up on a side stream before capturing
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            twins.load(step)
            twins.eager_step(0)
            twins.eager_step(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        twins.opts[1].step()  # recorded, not run: t, the weights and the state stay
    for step in range(3, 12):
        twins.load(step)
        twins.eager_step(0)
        graph.replay()
        twins.scheds[1].step()  # the next rate, filled in place outside the graph
    twins.check(12)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs through torch.compile")
@pytest.mark.parametrize("name", list(GRAPHED))
def test_a_step_compiled_with_reduce_overhead_matches_the_eager_step(name: str) -> None:
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs of Inductor's kernels) of the
    capturable step, with a changing rate: as the eager step (to Inductor's rounding: it fuses
    the elementwise path), compiled once."""
    twins = _Twins(name)
    torch._dynamo.reset()
    step = torch.compile(twins.opts[1].step, fullgraph=True, mode="reduce-overhead")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(8):
            twins.load(i)
            twins.eager_step(0)
            step()
            twins.scheds[1].step()
            twins.check(i + 1, rtol=1e-4)  # each step's statistics, before the next replay


@pytest.mark.skipif(not CUDA, reason="CUDA sync debug mode")
@pytest.mark.parametrize("name", list(GRAPHED))
def test_a_capturable_step_and_its_schedule_never_sync(name: str) -> None:
    twins = _Twins(name)
    for step in range(4):
        twins.load(step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            twins.eager_step(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    twins.load(4)
    assert twins.opts[1].step_count == 4
