"""A tensor learning rate, ``capturable=True`` and a compiled step without recompilation (#27).

What a CUDA graph needs of a step, checked on CPU: the rate, t and phi(t) on the device, nothing
read on the host, the scheduler writing the rate in place. The captures themselves (CUDA graphs,
``mode="reduce-overhead"``) are in ``test_cuda.py``.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
import torch._dynamo.testing
from optimizers import (
    EACH,
    F64,
    FOREACH,
    HostReadSpy,
    Info,
    Oracle,
    params_of,
    set_grads,
)
from torch import Tensor, nn

from lightning_tvlars import LAMB, TVLARS, SigmoidPhase, TVLARSScheduler, param_groups
from lightning_tvlars.optim import base, workspace
from lightning_tvlars.phase import ConstantPhase
from lightning_tvlars.schedule import FittedPhase

pytestmark = pytest.mark.optim

# Rates a scheduler might write, step by step (the tensor path must follow every change).
RATES = (0.5, 0.8, 0.3, 0.65, 0.1, 0.45)
# Options that exercise every branch of each update: decay, momentum with Nesterov, a norm
# clip (TVLARS); the global gradient clip and the decoupled decay (LAMB).
OPTIONS: dict[str, dict[str, Any]] = {
    "TVLARS": {"nesterov": True, "momentum": 0.9, "norm_clip": 2.0},
    "LAMB": {"max_grad_norm": 0.5, "decoupled_decay": True},
}


def _params(dtype: torch.dtype = torch.float64) -> list[Tensor]:
    torch.manual_seed(0)
    shapes = [(6, 5), (5,), (3, 5), (4, 3, 2), (7,)]
    return [nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


def _build(info: Info, params: list[Tensor], lr: float | Tensor, **kw: Any) -> Any:
    return info.build(info.two_groups(params), phased=True, lr=lr, **{**OPTIONS[info.name], **kw})


def _set_rate(opt: Any, rate: float) -> None:
    """What a scheduler does: a float replaced, a tensor filled in place."""
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


@pytest.mark.parametrize("capturable", [False, True], ids=["tensor-lr", "capturable"])
@FOREACH
@EACH
def test_a_tensor_rate_steps_exactly_as_the_float_rate(
    info: Info, foreach: bool | None, capturable: bool
) -> None:
    """float64, phase, weight decay, momentum with Nesterov (TVLARS), the global clip and the
    decoupled decay (LAMB), a rate that changes every step: the tensor path equals the float
    path bit for bit, and both equal the float64 oracle."""
    floats, tensors = _params(), _params()
    rate = torch.tensor(RATES[0], dtype=torch.float64)
    plain = _build(info, floats, RATES[0], foreach=foreach)
    held = _build(info, tensors, rate, foreach=foreach, capturable=capturable)
    assert held.param_groups[0]["lr"] is rate  # the other group's own float rate: a tensor
    assert isinstance(held.param_groups[1]["lr"], Tensor) == capturable  # only if capturable
    oracle = Oracle(plain, phased=True)
    for step, value in enumerate(RATES):
        for opt in (plain, held):
            _set_rate(opt, value)
            set_grads(params_of(opt), step)
        oracle.step()
        plain.step()
        held.step()
    for a, b in zip(floats, tensors, strict=True):
        assert torch.equal(a, b)
    oracle.check(F64)
    stats = held.last_step_stats
    assert [float(lr) for lr in stats.lr] == [RATES[-1]] * len(tensors)
    assert int(stats.step) == len(RATES) - 1 == plain.last_step_stats.step


@EACH
def test_capturable_keeps_t_the_rates_and_phi_on_the_device(info: Info) -> None:
    params = _params(torch.float32)
    opt = _build(info, params, 0.5, capturable=True)
    step = opt.param_groups[0]["step"]
    assert isinstance(step, Tensor) and step.dtype == torch.int64 and step.ndim == 0
    assert all(g["step"] is step for g in opt.param_groups)  # one clock for all groups
    for group in opt.param_groups:  # a float rate becomes a tensor in the groups' dtype
        assert isinstance(group["lr"], Tensor) and group["lr"].dtype == torch.float32
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))]})
    assert opt.param_groups[-1]["step"] is step
    assert isinstance(opt.param_groups[-1]["lr"], Tensor)
    spy = HostReadSpy()
    for i in range(3):
        set_grads(params_of(opt), i)
        with spy.armed():
            opt.step()
            stats = opt.last_step_stats
    assert spy.reads == []
    assert opt.param_groups[0]["step"] is step and int(step) == 3 == opt.step_count
    phase = SigmoidPhase(decay=0.3, delay=2.0)
    assert isinstance(stats.step, Tensor) and int(stats.step) == 2
    assert isinstance(stats.phase, Tensor) and float(stats.phase) == pytest.approx(phase(2))


def test_capturable_refuses_what_it_cannot_keep_on_the_device() -> None:
    w = nn.Parameter(torch.randn(3, 2))
    w.grad = torch.randn(3, 2)
    with pytest.raises(TypeError, match=r"phase=.* is invalid with capturable=True"):
        TVLARS([w], lr=0.5, capturable=True, phase=lambda t: 0.9**t)  # a host-only phase
    opt = TVLARS([w], lr=0.5, capturable=True)
    opt.phase = lambda t: 0.9**t  # installed later, as a scheduler installs its phase
    with pytest.raises(TypeError, match=r"phase=.* is invalid with capturable=True"):
        opt.step()
    meta = nn.Parameter(torch.randn(3, 2, device="meta"))
    with pytest.raises(ValueError, match=r"lr on cpu is invalid with capturable=True"):
        TVLARS([meta], lr=torch.tensor(0.5), capturable=True)


@EACH
def test_a_capture_refuses_grad_scaler_and_a_first_step(
    info: Info, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a CUDA graph capture (simulated: CPU has none) a step refuses GradScaler's
    tensors, which a replay would not read again, and a step that would lay its tensors out
    (copies from the host): torch's own rule is to warm up before capturing."""
    params = _params(torch.float32)
    opt = _build(info, params, 0.5, capturable=True)
    set_grads(params, 0)
    monkeypatch.setattr(workspace, "capturing", lambda: True)
    with pytest.raises(ValueError, match=r"inside a CUDA graph capture.*eager steps first"):
        opt.step()
    monkeypatch.setattr(workspace, "capturing", lambda: False)
    opt.step()  # the warm-up
    monkeypatch.setattr(workspace, "capturing", lambda: True)
    monkeypatch.setattr(base, "capturing", lambda: True)
    opt.step()  # laid out already: nothing refused
    opt.found_inf = torch.zeros(())
    with pytest.raises(ValueError, match="GradScaler step is invalid inside a CUDA graph"):
        opt.step()


def test_the_device_phase_equals_the_host_phase_and_never_overflows() -> None:
    """phi(t) from the device's int64 t equals the host's float64 value (to float64 rounding);
    far past the decay exp overflows and phi is exactly the floor, never inf or nan."""
    phase = SigmoidPhase(alpha=0.1, decay=5e-3, delay=-1.0, floor=0.02)
    steps = [0, 1, 7, 1_000, 141_000, 142_000, 10**7, 2**62]
    device = phase.tensor(torch.tensor(steps, dtype=torch.int64))
    assert device.dtype == torch.float64 and torch.isfinite(device).all()
    host = torch.tensor([phase(t) for t in steps], dtype=torch.float64)
    torch.testing.assert_close(device, host, rtol=1e-13, atol=0.0)
    assert device[-3:].tolist() == [0.02] * 3  # exp overflowed: the floor exactly
    held = ConstantPhase(0.25).tensor(torch.tensor(5))
    assert held.dtype == torch.float64 and float(held) == 0.25


@EACH
def test_the_scheduler_writes_a_tensor_rate_in_place_and_never_reads_it(info: Info) -> None:
    """A warm-up, cosine annealing and a fitted phase on a capturable optimizer: the rate
    tensors are never replaced, hold each step's scheduled rate, and the step applies exactly
    what the float path applies (float64); neither the step nor ``scheduler.step()`` reads a
    device value on the host."""
    floats, tensors = _params(), _params()
    plain = _build(info, floats, 0.5)
    held = _build(info, tensors, 0.5, capturable=True)
    schedule = {"total_steps": 8, "warmup_fraction": 0.25, "lr_schedule": "cosine"}
    for opt in (plain, held):
        opt.phase = None  # the scheduler owns the phase
    plain_sched = TVLARSScheduler(plain, phase=FittedPhase(), **schedule)
    sched = TVLARSScheduler(held, phase=FittedPhase(), **schedule)
    rates = [g["lr"] for g in held.param_groups]
    spy = HostReadSpy()
    for step in range(8):
        set_grads(floats, step)
        set_grads(tensors, step)
        plain.step()
        plain_sched.step()
        with spy.armed():
            held.step()
            sched.step()
        assert [g["lr"] for g in held.param_groups] == rates  # the same objects
        assert [float(r) for r in rates] == [g["lr"] for g in plain.param_groups]
        phase = plain.last_step_stats.phase
        assert float(held.last_step_stats.phase) == pytest.approx(phase, rel=1e-14)
    assert spy.reads == []
    assert sched.clock == plain_sched.clock == 8 == held.step_count
    for a, b in zip(floats, tensors, strict=True):
        torch.testing.assert_close(a, b, **F64)
    held.param_groups[0]["lr"] = 0.1  # replaced by someone else: refused at the next step
    with pytest.raises(ValueError, match="something else wrote it"):
        held.step()


def test_a_tensor_rate_without_capturable_follows_the_optimizers_clock() -> None:
    """Without ``capturable`` t is a host int: ``scheduler.step()`` writes the tensor rate of
    the optimizer's t, whichever count of scheduler steps."""
    w = nn.Parameter(torch.ones(3))
    rate = torch.tensor(1.0)
    opt = TVLARS([w], lr=rate)
    sched = TVLARSScheduler(opt, total_steps=10, lr_schedule="polynomial", lr_power=1.0)
    for _ in range(4):
        w.grad = torch.ones(3)
        opt.step()
    assert float(rate) == 1.0  # the hooks leave a tensor rate alone
    sched.step()
    assert opt.param_groups[0]["lr"] is rate
    assert float(rate) == pytest.approx(sched.applied_lr(4), rel=1e-6)


@EACH
def test_capturable_state_round_trips_and_copies_keep_one_clock(info: Info) -> None:
    params = _params()
    opt = _build(info, params, 0.5, capturable=True)
    for i in range(3):
        set_grads(params, i)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _build(info, _params(), 0.5, capturable=True)
    fresh.load_state_dict(saved)
    step = fresh.param_groups[0]["step"]
    assert isinstance(step, Tensor) and all(g["step"] is step for g in fresh.param_groups)
    assert int(step) == 3
    plain = _build(info, _params(), 0.5)
    plain.load_state_dict(saved)  # into a host clock
    assert all(g["step"] == 3 and isinstance(g["step"], int) for g in plain.param_groups)
    twin = copy.deepcopy(opt)
    assert twin.capturable and all(
        g["step"] is twin.param_groups[0]["step"] for g in twin.param_groups
    )
    assert twin.param_groups[0]["step"] is not opt.param_groups[0]["step"]


COMPILED = {
    "TVLARS": lambda ps, lr, cap: TVLARS(ps, lr=lr, norm_clip=10.0, capturable=cap),
    "LAMB": lambda ps, lr, cap: LAMB(ps, lr=lr, max_grad_norm=1.0, capturable=cap),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(COMPILED))
def test_a_compiled_capturable_step_compiles_once_for_a_whole_schedule(name: str) -> None:
    """``torch.compile(opt.step, fullgraph=True)`` with ``capturable=True`` (two groups, the
    state created by the first call): one frame, no recompilation while the scheduler changes
    the rate (warm-up, cosine) and the phase advances, and the same weights as the eager float
    path."""
    torch.manual_seed(0)
    eager_model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    compiled_model = copy.deepcopy(eager_model)
    eager = COMPILED[name](param_groups(eager_model, weight_decay=1e-3), 0.05, False)
    held = COMPILED[name](param_groups(compiled_model, weight_decay=1e-3), 0.05, True)
    schedule = {"total_steps": 7, "warmup_fraction": 0.3, "lr_schedule": "cosine"}
    eager_sched = TVLARSScheduler(eager, phase=FittedPhase(), **schedule)
    sched = TVLARSScheduler(held, phase=FittedPhase(), **schedule)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step = torch.compile(held.step, fullgraph=True, backend=counter)
    x = torch.randn(16, 8)
    phases, rates = [], []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(7):
            for model, opt in ((eager_model, eager), (compiled_model, held)):
                opt.zero_grad()
                model(x).square().mean().backward()
            eager.step()
            eager_sched.step()
            step()
            sched.step()
            phases.append(float(held.last_step_stats.phase))
            rates.append(float(held.last_step_stats.lr[0]))
    assert counter.frame_count == 1
    assert len(set(phases)) == len(set(rates)) == 7  # both changed every step
    assert rates == pytest.approx([eager_sched.applied_lr(t) for t in range(7)], rel=1e-6)
    assert held.step_count == 7
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_true_compiles_the_update_once_and_runs_the_closure_eagerly(name: str) -> None:
    """``compiled=True``: ``step(closure)`` (Lightning's call) runs the closure's forward and
    backward eagerly and the update compiled once for a whole schedule (no recompilation while
    the rate and phi change); the weights equal the eager float path's; a deep copy steps on
    as a compiled optimizer of its own."""
    torch.manual_seed(0)
    eager_model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    compiled_model = copy.deepcopy(eager_model)
    eager = COMPILED[name](param_groups(eager_model, weight_decay=1e-3), 0.05, False)
    held = type(eager)(param_groups(compiled_model, weight_decay=1e-3), **_options(eager))
    assert held.compiled and held.capturable
    assert isinstance(held.param_groups[0]["lr"], torch.Tensor)
    schedule = {"total_steps": 7, "warmup_fraction": 0.3, "lr_schedule": "cosine"}
    eager_sched = TVLARSScheduler(eager, phase=FittedPhase(), **schedule)
    sched = TVLARSScheduler(held, phase=FittedPhase(), **schedule)
    x = torch.randn(16, 8)

    def closure(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(7):
            expected = eager.step(lambda: closure(eager_model, eager))
            eager_sched.step()
            losses.append(held.step(lambda: closure(compiled_model, held)))
            sched.step()
            torch.testing.assert_close(losses[-1], expected, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert all(loss.requires_grad for loss in losses)  # the closure ran with grad enabled
    assert held.step_count == 7
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(held)
    assert twin.compiled and twin._compiled_update is None  # compiles its own on first use
    twin.step()  # no gradients changed: one more step on its own copies
    assert twin.step_count == 8 and held.step_count == 7


def _options(opt: torch.optim.Optimizer) -> dict:
    """The constructor options of ``COMPILED``'s optimizers, with ``compiled=True``."""
    if isinstance(opt, TVLARS):
        return {"lr": 0.05, "norm_clip": 10.0, "compiled": True}
    return {"lr": 0.05, "max_grad_norm": 1.0, "compiled": True}


def test_compiled_is_validated() -> None:
    with pytest.raises(TypeError, match=r"compiled='yes' is invalid: expected True or False"):
        TVLARS([nn.Parameter(torch.ones(2))], lr=1.0, compiled="yes")  # type: ignore[arg-type]


@pytest.mark.timeout(600)
def test_compiled_true_under_a_grad_scaler_skips_on_the_device_as_eager() -> None:
    """``scaler.step(optimizer)`` with ``compiled=True``: the scaler's scale and verdict reach
    the compiled update (one graph for clean and overflowing steps alike), which unscales,
    skips the overflowing step and leaves the weights and the scale of the eager step."""
    torch.manual_seed(0)
    eager_model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    compiled_model = copy.deepcopy(eager_model)
    eager = TVLARS(param_groups(eager_model, weight_decay=1e-3), lr=0.1, capturable=True)
    held = TVLARS(param_groups(compiled_model, weight_decay=1e-3), lr=0.1, compiled=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    x = torch.randn(16, 8)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    skipped = []
    for step in range(5):
        blow_up = float("inf") if step == 2 else 1.0
        pairs = zip((eager_model, compiled_model), (eager, held), scalers, strict=True)
        for model, opt, scaler in pairs:
            opt.zero_grad()
            scaler.scale(model(x).square().mean() * blow_up).backward()
            scaler.step(opt)
            scaler.update()
        skipped.append(bool(held.last_step_stats.skipped))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert skipped == [False, False, True, False, False]
    assert scalers[0].get_scale() == scalers[1].get_scale() == 512.0
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.timeout(600)
def test_every_compiled_optimizer_has_its_own_compilations() -> None:
    """Dynamo keeps compiled code per code object, guarded on ``self``: if all optimizers of a
    class shared one, each new optimizer (a fold, a sweep, an LR finder and the fit) would add
    a compilation to the others' until torch's recompile limit made the next one fail. With
    the limit at 1: three in a row, each compiled once, no warning."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compiling afresh"
        for fold in range(3):
            model = _tiny()
            opt = TVLARS(param_groups(model, weight_decay=1e-3), lr=0.1, compiled=True)
            for step in range(2):
                _grads(model, step)
                opt.step()
            assert opt.step_count == 2, fold


@pytest.mark.timeout(600)
def test_compiled_true_compiles_afresh_with_a_warning_past_the_recompile_limit() -> None:
    """A float written into a group's rate by hand (not in place) changes what the compiled
    update reads: past torch's recompile limit the step warns and compiles afresh instead of
    failing, and steps as the eager one does."""
    torch.manual_seed(0)
    eager_model = _tiny()
    compiled_model = copy.deepcopy(eager_model)
    eager = TVLARS(param_groups(eager_model, weight_decay=1e-3), lr=0.1)
    held = TVLARS(param_groups(compiled_model, weight_decay=1e-3), lr=0.1, compiled=True)
    torch._dynamo.reset()
    with (
        torch._dynamo.config.patch(recompile_limit=1),
        pytest.warns(UserWarning, match=r"TVLARS\(compiled=True\): the update reached torch's"),
    ):
        for step, rate in enumerate(RATES):
            for model, opt in ((eager_model, eager), (compiled_model, held)):
                _grads(model, step)
                for group in opt.param_groups:
                    group["lr"] = rate  # a float, replacing the tensor
                opt.step()
    assert held.step_count == len(RATES)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(600)
def test_compiled_lamb_follows_betas_changed_by_one_cycle_lr() -> None:
    """OneCycleLR cycles LAMB's beta1 every step (``cycle_momentum``): the compiled update is
    recompiled for each new value and steps as the eager one does (with the betas as symbolic
    floats, Inductor computed ``beta1 ** k`` with the first value); past the recompile limit it
    warns and compiles afresh."""
    torch.manual_seed(0)
    eager_model = _tiny()
    compiled_model = copy.deepcopy(eager_model)
    eager = LAMB(eager_model.parameters(), lr=0.1)
    held = LAMB(compiled_model.parameters(), lr=0.1, compiled=True)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=30)
        for opt in (eager, held)
    ]
    torch._dynamo.reset()
    betas = set()
    with (
        torch._dynamo.config.patch(recompile_limit=3),
        pytest.warns(UserWarning, match=r"LAMB\(compiled=True\): the update reached torch's"),
    ):
        for step in range(5):
            pairs = zip((eager_model, compiled_model), (eager, held), scheds, strict=True)
            for model, opt, sched in pairs:
                _grads(model, step)
                opt.step()
                sched.step()
            betas.add(held.param_groups[0]["betas"][0])
            for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert len(betas) == 5


@EACH
def test_what_a_compiled_update_cannot_run_is_refused_before_tracing(info: Info) -> None:
    """Refused with the package's error, not Dynamo's from inside a trace: a host-only phase
    (when built), sharded parameters (when built or added), sparse gradients (at the step,
    before the closure's result is used)."""
    w = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(TypeError, match=r"invalid with capturable=True or compiled=True"):
        info.cls([w], lr=0.1, compiled=True, phase=lambda t: 0.99**t)
    shard = nn.Parameter(torch.randn(3, 2))
    shard._fsdp_flattened = True  # type: ignore[attr-defined]  # as FSDP1 marks its views
    with pytest.raises(ValueError, match="compiled=True is not supported with sharded"):
        info.build([shard], compiled=True)
    opt = info.build([w], compiled=True)
    with pytest.raises(ValueError, match="compiled=True is not supported with sharded"):
        opt.add_param_group({"params": [shard]})
    w.grad = torch.randn(3, 2).to_sparse()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()


@EACH
def test_an_eager_checkpoint_loads_into_a_capturable_optimizer_with_device_rates(
    info: Info,
) -> None:
    """Resuming an eager run with ``capturable``/``compiled`` on: the checkpoint's float rates
    become device tensors (a float would be baked into a CUDA graph or recompile a compiled
    update at every change), and a scheduler then writes them in place."""
    params = _params()
    eager = _build(info, params, 0.5)
    set_grads(params, 0)
    eager.step()
    held = _build(info, [nn.Parameter(p.detach().clone()) for p in params], 0.5, compiled=True)
    held.load_state_dict(eager.state_dict())
    rates = [group["lr"] for group in held.param_groups]
    assert all(isinstance(r, Tensor) and r.ndim == 0 for r in rates)
    assert [float(r) for r in rates] == [g["lr"] for g in eager.param_groups]
    torch.optim.lr_scheduler.LambdaLR(held, lambda t: 0.5)  # writes the first rate
    assert all(group["lr"] is r for group, r in zip(held.param_groups, rates, strict=True))
    assert float(rates[0]) == pytest.approx(eager.param_groups[0]["lr"] / 2)  # filled in place
