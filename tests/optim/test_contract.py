"""The torch.optim contract, for every optimizer of the family (the rows of ``optimizers.py``).

Ported in spirit (not in code) from PyTorch's generic optimizer tests (``test/test_optim.py``,
the ``OptimizerInfo`` inputs of ``common_optimizers.py``, the LR scheduler, SWA and GradScaler
tests) and from timm's: everything that applies to a third-party optimizer. Updates are
checked against the independent float64 oracles of ``reference_impl.py``.

Not ported, on purpose: complex and sparse parameters (refused), ``differentiable`` and
``fused`` (refused by name), LBFGS-style closures and the CUDA-only tests (``test_cuda.py``).
``capturable`` and ``compiled`` have their own tests (``test_capture.py``); the compiled update
is checked on every layout here.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from optimizers import (
    EACH,
    F32,
    F64,
    FOREACH,
    PHASED,
    Info,
    assert_params_equal,
    assert_same,
    assert_state_equal,
    batch,
    forward_backward,
    net_optimizer,
    no_host_reads_inside_step,
    params_of,
    set_grads,
    small_net,
)
from torch import Tensor, nn
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

import lightning_tvlars
from lightning_tvlars.optim import workspace

pytestmark = pytest.mark.optim


def test_the_host_read_spy_catches_a_read() -> None:
    """Negative control for ``no_host_reads_inside_step``: a step that reads is caught."""

    class Reading(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            if self.param_groups[0]["params"][0].grad.abs().sum() > 0:  # Tensor.__bool__
                return super().step(closure)
            return None

    w = nn.Parameter(torch.randn(3))
    opt = Reading([w], lr=0.1)
    w.grad = torch.ones(3)
    with no_host_reads_inside_step(opt) as reads, pytest.raises(AssertionError, match="host"):
        opt.step()
    assert reads == ["__bool__"]
    assert bool(torch.ones(())) is True  # disarmed again


def test_the_host_read_spy_catches_a_read_inside_a_kernel() -> None:
    """Negative control: a host read that torch makes in C++ (a foreach operator with a 0-d
    tensor operand on CPU) is caught too, and only inside the step."""

    class Counting(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            counts = [torch.zeros(()) for _ in range(3)]
            torch._foreach_add_(counts, torch.ones(()))
            return super().step(closure)

    w = nn.Parameter(torch.randn(3))
    opt = Counting([w], lr=0.1)
    w.grad = torch.ones(3)
    with no_host_reads_inside_step(opt) as reads:
        torch._foreach_add_([torch.zeros(())], torch.ones(()))  # outside the step: not counted
        opt.step()
    assert reads and set(reads) == {"aten._local_scalar_dense"}


# ----------------------------------------------------------------------------- 1. layouts


@dataclass
class Layout:
    """Parameters laid out in memory in one particular way, and gradients laid out alike.

    ``outside`` holds views of memory that shares storage with the parameters (or, per step, with
    the gradients) but belongs to none of them: the optimizer must never write there.
    """

    params: list[nn.Parameter]
    outside: list[Tensor]
    grads: Callable[[int], tuple[list[Tensor], list[Tensor]]]  # step -> (grads, outside views)
    # the parameters as seen through the tensors they are views of (empty: not views)
    views_of_bases: Callable[[], list[Tensor]] = field(default=lambda: [])


def _values(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen)


def _layout_contiguous() -> Layout:
    params = [nn.Parameter(torch.randn(6, 5)) for _ in range(2)]
    params += [nn.Parameter(torch.randn(5)) for _ in range(2)]

    def grads(step: int) -> tuple[list[Tensor], list[Tensor]]:
        gen = torch.Generator().manual_seed(step)
        return [_values(tuple(p.shape), gen) for p in params], []

    return Layout(params, [], grads)


def _layout_gaps() -> Layout:
    """``base[..., 0]``: strided, every other element belongs to someone else."""
    bases = [torch.randn(10, 5, 2), torch.randn(10, 5, 2), torch.randn(10, 2), torch.randn(10, 2)]
    params = [nn.Parameter(b[..., 0]) for b in bases]

    def grads(step: int) -> tuple[list[Tensor], list[Tensor]]:
        gen = torch.Generator().manual_seed(step)
        gbases = [_values(tuple(b.shape), gen) for b in bases]
        return [g[..., 0] for g in gbases], [g[..., 1] for g in gbases]

    return Layout(params, [b[..., 1] for b in bases], grads, lambda: [b[..., 0] for b in bases])


def _layout_transposed() -> Layout:
    bases = [torch.randn(5, 6), torch.randn(4, 6), torch.randn(5, 6), torch.randn(3, 2)]
    params = [nn.Parameter(b.t()) for b in bases]

    def grads(step: int) -> tuple[list[Tensor], list[Tensor]]:
        gen = torch.Generator().manual_seed(step)
        return [_values(tuple(b.shape), gen).t() for b in bases], []

    return Layout(params, [], grads, lambda: [b.t() for b in bases])


def _layout_channels_last(grad_format: torch.memory_format) -> Callable[[], Layout]:
    def build() -> Layout:
        cl = torch.channels_last
        params = [
            nn.Parameter(torch.randn(4, 3, 3, 2).contiguous(memory_format=cl)) for _ in range(4)
        ]
        for p in params:
            assert p.is_contiguous(memory_format=cl) and not p.is_contiguous()

        def grads(step: int) -> tuple[list[Tensor], list[Tensor]]:
            gen = torch.Generator().manual_seed(step)
            gs = [
                _values(tuple(p.shape), gen).contiguous(memory_format=grad_format) for p in params
            ]
            return gs, []

        return Layout(params, [], grads)

    return build


def _flat(shapes: list[tuple[int, ...]], gap: int, gen: torch.Generator | None = None) -> Any:
    """One flat buffer holding tensors of ``shapes`` with ``gap`` foreign elements between them."""
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes) + gap * (len(shapes) + 1)
    flat = torch.randn(total, generator=gen) if gen is not None else torch.randn(total)
    views, gaps, start = [], [], gap
    gaps.append(flat[0:gap])
    for shape, size in zip(shapes, sizes, strict=True):
        views.append(flat[start : start + size].view(shape))
        gaps.append(flat[start + size : start + size + gap])
        start += size + gap
    return flat, views, gaps


_FLAT_SHAPES = [(3, 4), (2, 2, 3), (5,), (6,)]


def _layout_flat_buffer() -> Layout:
    """Several parameters that are views of one big tensor, with foreign bytes between them."""
    _, views, gaps = _flat(_FLAT_SHAPES, gap=2)
    params = [nn.Parameter(v) for v in views]

    def grads(step: int) -> tuple[list[Tensor], list[Tensor]]:
        _, gviews, ggaps = _flat(_FLAT_SHAPES, gap=2, gen=torch.Generator().manual_seed(step))
        return gviews, ggaps

    return Layout(params, gaps, grads, lambda: views)


def _layout_zero_dim() -> Layout:
    params = [nn.Parameter(torch.tensor(v)) for v in (0.7, -1.3, 0.4, 2.0)]

    def grads(step: int) -> tuple[list[Tensor], list[Tensor]]:
        gen = torch.Generator().manual_seed(step)
        return [_values((), gen) for _ in params], []

    return Layout(params, [], grads)


LAYOUTS = {
    "contiguous": _layout_contiguous,
    "gaps": _layout_gaps,
    "transposed": _layout_transposed,
    "channels_last": _layout_channels_last(torch.channels_last),
    "channels_last_contiguous_grad": _layout_channels_last(torch.contiguous_format),
    "flat_buffer_views": _layout_flat_buffer,
    "zero_dim": _layout_zero_dim,
}


def _merged(cases: list[Layout]) -> Layout:
    """Every case's parameters in one list (the cases' gradients and bases alike)."""

    def grads(step: int) -> tuple[list[Tensor], list[Tensor]]:
        pairs = [case.grads(step) for case in cases]
        return [g for gs, _ in pairs for g in gs], [o for _, os in pairs for o in os]

    def views() -> list[Tensor]:  # a case without bases: its parameters stand for themselves
        return [v for case in cases for v in (case.views_of_bases() or case.params)]

    params = [p for case in cases for p in case.params]
    return Layout(params, [o for case in cases for o in case.outside], grads, views)


def _check_layout(info: Info, case: Layout, phased: bool, **options: Any) -> Any:
    """Four steps against the oracle; nothing outside the tensors written; updated in place;
    the state laid out like the parameters."""
    outside_before = [o.clone() for o in case.outside]
    ptrs = [p.data_ptr() for p in case.params]
    opt = info.build(info.two_groups(case.params), phased=phased, **options)
    oracle = info.oracle(opt, phased)
    for step in range(4):
        grads, grad_outside = case.grads(step)
        grad_outside_before = [o.clone() for o in grad_outside]
        for p, g in zip(case.params, grads, strict=True):
            p.grad = g
        oracle.step()
        opt.step()
        for i, (o, before) in enumerate(zip(grad_outside, grad_outside_before, strict=True)):
            assert torch.equal(o, before), f"step {step} wrote outside gradient {i}"
    oracle.check()
    for i, (o, before) in enumerate(zip(case.outside, outside_before, strict=True)):
        assert torch.equal(o, before), f"bytes outside the parameters were written ({i})"
    # updated in place: still the same memory, still visible through the base tensors
    assert [p.data_ptr() for p in case.params] == ptrs
    views = case.views_of_bases()
    for view, p in zip(views, case.params if views else [], strict=True):
        assert torch.equal(view, p.detach())
    for p in case.params:
        for key in info.state_keys:
            state = opt.state[p][key]
            if key != "step":
                assert state.shape == p.shape and state.dtype == p.dtype
                if workspace.is_dense(p):  # laid out like the parameter where it can be
                    assert state.stride() == p.stride()
    return opt


@pytest.mark.parametrize("layout", list(LAYOUTS))
@PHASED
@FOREACH
@EACH
def test_every_memory_layout_matches_the_reference(
    info: Info, layout: str, foreach: bool | None, phased: bool
) -> None:
    _check_layout(info, LAYOUTS[layout](), phased, foreach=foreach)


@PHASED
@EACH
def test_the_compiled_update_matches_the_reference_on_every_layout(
    info: Info, phased: bool
) -> None:
    """``compiled=True`` (the elementwise path, fused by Inductor) on all the layouts at once:
    one compilation per optimizer, the same checks as the eager paths."""
    case = _merged([build() for build in LAYOUTS.values()])
    opt = _check_layout(info, case, phased, compiled=True)
    assert opt._compiled_update is not None  # the steps ran compiled


@pytest.mark.parametrize("cpu_batch", [1000, 1 << 20], ids=["pieces", "one-batch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@PHASED
@EACH
def test_cpu_batches_and_pieces_of_big_tensors_match_the_reference(
    info: Info, phased: bool, dtype: torch.dtype, cpu_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the multi-tensor path works batch by batch and cuts big tensors into pieces:
    with a tiny batch every case (several batches, pieces, a 0-d tensor) matches the oracle."""
    monkeypatch.setattr(workspace, "CPU_BATCH", cpu_batch)
    shapes = [(40, 30), (7,), (3000,), (5, 5, 3, 3), (), (2500, 1), (10,)]
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = info.build(info.two_groups(params), phased=phased)
    oracle = info.oracle(opt, phased)
    for step in range(4):
        set_grads(params, step)
        oracle.step()
        opt.step()
    if cpu_batch == 1000:
        assert max(len(layout.batches) for layout in opt._layouts.layouts()) > 2
    oracle.check()


@PHASED
@EACH
def test_the_accelerator_path_matches_the_reference_on_cpu(
    info: Info, phased: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accelerators take the multi-tensor path without CPU batching (one batch, multi-tensor
    calls over it, the per-block scale): run that path here, where the oracle can check it."""
    monkeypatch.setattr(workspace, "BATCHED_DEVICES", frozenset())
    model = small_net().double()
    opt = net_optimizer(info, model, phased=phased)
    oracle = info.oracle(opt, phased)
    for i in range(5):
        forward_backward(model, opt, i)
        oracle.step()
        opt.step()
    oracle.check()


@pytest.mark.parametrize("batched", [True, False], ids=["cpu-batches", "accelerator-path"])
@EACH
def test_cached_layouts_follow_what_changes_between_steps(
    info: Info, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each change a run can make between two steps stays exact: a gradient with other strides,
    a parameter without a gradient, replaced storage, state from a state dict or reset by hand,
    a group option that changes the path."""
    if batched:
        monkeypatch.setattr(workspace, "CPU_BATCH", 1000)  # (40, 30) is cut into pieces
    else:
        monkeypatch.setattr(workspace, "BATCHED_DEVICES", frozenset())
    gen = torch.Generator().manual_seed(4)
    params = [
        nn.Parameter(torch.randn(s, generator=gen).double()) for s in [(40, 30), (3,), (5, 6)]
    ]
    groups = [
        {"params": [params[0], params[2]], **info.adapted},
        {"params": [params[1]], **info.excluded},
    ]
    opt = info.build(groups, phased=True)
    oracle = info.oracle(opt, True)

    def column_major(g: Tensor) -> Tensor:
        return g.t().contiguous().t()

    # Every change comes after a step without one, so that it alone can trigger the rebuild.
    for step in range(13):
        grads = set_grads(params, step)
        if step == 2:
            params[0].grad = column_major(grads[0])
        if step == 4:
            params[2].grad = None
        if step == 6:
            params[0].data = params[0].data.clone()
            oracle.shadow[id(params[0])] = oracle.shadow[id(params[0])]  # same values
        if step == 7:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if step == 11:
            opt.param_groups[1]["weight_decay"] = 1e-2
        oracle.step()
        opt.step()
        oracle.check(F64)


def test_a_layout_is_not_reused_for_another_tensor_at_a_recycled_address() -> None:
    """Storage swapped out of a parameter a layout holds can come back as another parameter's,
    at the same address, size and strides: the layout must not update the old parameter."""
    from reference_impl import PlainTVLARS

    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = lightning_tvlars.TVLARS([p], lr=0.5, momentum=0.0, weight_decay=1e-2)  # no state
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


@EACH
def test_layouts_of_groups_that_leave_the_step_are_dropped(info: Info) -> None:
    """A removed group, a frozen one and one switched to the elementwise path release the
    tensors and the workspaces their layout held."""
    import gc
    import weakref

    params = [nn.Parameter(torch.randn(6, 5)) for _ in range(4)]
    opt = info.build([{"params": [p]} for p in params])

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


@EACH
def test_state_of_another_dtype_takes_the_elementwise_path(info: Info) -> None:
    """Weights cast after some steps (``model.to(dtype)``) keep state of the old dtype, which
    the fused kernels cannot take: the step must match the elementwise path."""
    runs = []
    for foreach in (None, False):
        gen = torch.Generator().manual_seed(1)
        ws = [
            nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in [(5, 4), (7,)]
        ]
        opt = info.build(info.two_groups(ws), foreach=foreach)
        for step in range(4):
            if step == 2:
                for w in ws:
                    w.data = w.data.float()
            set_grads(ws, step)
            opt.step()
        runs.append(ws)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 2. dtypes


@PHASED
@FOREACH
@EACH
def test_mixed_dtypes_each_match_the_reference(
    info: Info, foreach: bool | None, phased: bool
) -> None:
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    weights = [nn.Parameter(torch.randn(4, 3).to(d)) for d in dtypes]
    biases = [nn.Parameter(torch.randn(3).to(d)) for d in dtypes]
    opt = info.build(
        [{"params": weights, **info.adapted}, {"params": biases, **info.excluded}],
        phased=phased,
        foreach=foreach,
    )
    oracle = info.oracle(opt, phased)
    for step in range(4):
        set_grads(params_of(opt), step)
        oracle.step()
        opt.step()
    oracle.check()
    assert [p.dtype for p in params_of(opt)] == [*dtypes, *dtypes]
    for p in params_of(opt):
        assert all(opt.state[p][k].dtype == p.dtype for k in info.state_keys if k != "step")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@EACH
def test_sixteen_bit_tensors_are_computed_in_float32_on_every_path(
    info: Info, dtype: torch.dtype
) -> None:
    """16-bit weights and state, updated in float32 and rounded once per step, as torch's fused
    kernels do: both paths agree to the last bit and stay within a rounding of a float32 run
    (weight decay and, for TVLARS, the norm clip included: where 16-bit arithmetic went
    10% astray after 7 steps)."""
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(s, generator=gen) for s in [(16, 8), (8,), (4, 4, 3)]]
    clip = {"norm_clip": 2.0} if info.name == "TVLARS" else {}
    runs = {}
    for label, foreach, d in (
        ("multi", None, dtype),
        ("single", False, dtype),
        ("f32", None, torch.float32),
    ):
        params = [nn.Parameter(w.to(d)) for w in start]
        opt = info.build(info.two_groups(params), phased=True, foreach=foreach, **clip)
        for step in range(7):
            set_grads(params, step)
            opt.step()
        runs[label] = params
    for a, b, c in zip(runs["multi"], runs["single"], runs["f32"], strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.float(), c.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@FOREACH
@EACH
def test_low_precision_parameters_get_float32_norms(
    info: Info, dtype: torch.dtype, foreach: bool | None
) -> None:
    # 4096 elements of 300: the squared norm (3.7e8) overflows float16 but not float32
    w = torch.full((64, 64), 300.0, dtype=dtype, requires_grad=True)
    w.grad = torch.full((64, 64), 1.0, dtype=dtype)
    opt = info.build([{"params": [w], **info.adapted}], foreach=foreach)
    opt.step()
    stats = opt.last_step_stats
    assert stats.weight_norm.dtype == torch.float32
    torch.testing.assert_close(stats.weight_norm, torch.tensor([300.0 * 64]))
    assert not bool(stats.skipped)
    assert w.dtype == dtype and torch.isfinite(w).all()


# ----------------------------------------------------------------------------- 3. copies


def _copy_deepcopy(model: nn.Module, opt: Any) -> tuple[nn.Module | None, Any]:
    return None, copy.deepcopy(opt)


def _copy_pickle(model: nn.Module, opt: Any) -> tuple[nn.Module | None, Any]:
    return pickle.loads(pickle.dumps((model, opt)))


def _copy_torch_save(model: nn.Module, opt: Any) -> tuple[nn.Module | None, Any]:
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": _copy_deepcopy, "pickle": _copy_pickle, "torch_save": _copy_torch_save}


@pytest.mark.parametrize("how", list(COPIES))
@PHASED
@FOREACH
@EACH
def test_a_copy_steps_exactly_like_the_original(
    info: Info, how: str, foreach: bool | None, phased: bool
) -> None:
    model = small_net()
    opt = net_optimizer(info, model, foreach, phased)
    for step in range(3):
        set_grads(params_of(opt), step)
        opt.step()
    model_copy, twin = COPIES[how](model, opt)
    assert type(twin) is info.cls
    assert twin.step_count == opt.step_count == 3
    if model_copy is not None:  # pickled together: the copy still optimizes the copied model
        assert sorted(map(id, params_of(twin))) == sorted(map(id, model_copy.parameters()))
    for step in range(3, 7):
        for o in (opt, twin):
            set_grads(params_of(o), step)
            o.step()
        assert_params_equal(params_of(opt), params_of(twin), f"after step {step}")
        assert_state_equal(opt, twin)
    assert twin.step_count == opt.step_count == 7


@EACH
def test_deepcopy_keeps_every_public_attribute(info: Info) -> None:
    opt = net_optimizer(info, small_net(), phased=True)
    set_grads(params_of(opt), 0)
    opt.step()

    def public(o: object) -> dict[str, Any]:
        return {k: v for k, v in vars(o).items() if not k.startswith("_")}

    twin = copy.deepcopy(opt)
    assert set(public(twin)) == set(public(opt))
    assert all(twin.defaults.get(k) == v for k, v in opt.defaults.items())


def _sd_via_torch_save(sd: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same(loaded, sd)  # what comes back is what went in
    return loaded


TRANSPORTS = {"deepcopy": copy.deepcopy, "torch_save_weights_only": _sd_via_torch_save}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@PHASED
@FOREACH
@EACH
def test_state_dict_round_trip_continues_bit_for_bit(
    info: Info, transport: str, foreach: bool | None, phased: bool
) -> None:
    model = small_net()
    opt = net_optimizer(info, model, foreach, phased)

    def closure(m: nn.Module, o: Any, i: int) -> Callable[[], Tensor]:
        return lambda: forward_backward(m, o, i)

    for i in range(5):
        opt.step(closure(model, opt, i))
    twin_model = copy.deepcopy(model)
    twin = net_optimizer(info, twin_model, foreach, phased)
    assert twin.step_count == 0
    twin.load_state_dict(TRANSPORTS[transport](opt.state_dict()))
    assert twin.step_count == 5
    for i in range(5, 10):
        opt.step(closure(model, opt, i))
        twin.step(closure(twin_model, twin, i))
        assert_params_equal(list(model.parameters()), list(twin_model.parameters()), f"step {i}")
    assert_same(opt.state_dict(), twin.state_dict())
    assert all(set(s) == set(info.state_keys) for s in opt.state.values())


@EACH
def test_state_dict_layout_is_stable_and_older_ones_load(info: Info) -> None:
    model = small_net()
    opt = net_optimizer(info, model, phased=True)
    forward_backward(model, opt, 0)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    assert ids == list(range(len(params_of(opt))))
    assert set(sd["state"]) <= set(ids) and all(isinstance(k, int) for k in sd["state"])
    assert_same(sd, opt.state_dict())  # asking twice gives the same answer
    assert repr(opt).startswith(f"{info.name} (")
    # torch's test_can_load_older_state_dict: checkpoints from before a flag existed
    old = copy.deepcopy(sd)
    for group in old["param_groups"]:
        for key in ("foreach", "maximize"):
            group.pop(key, None)
    opt.load_state_dict(old)
    assert all(g["foreach"] is None and g["maximize"] is False for g in opt.param_groups)
    forward_backward(model, opt, 1)
    opt.step()
    assert opt.step_count == 2


@pytest.mark.parametrize("named_before", [True, False])
@pytest.mark.parametrize("named_after", [True, False])
@EACH
def test_named_and_unnamed_state_dicts_load_into_each_other(
    info: Info, named_before: bool, named_after: bool
) -> None:
    model = small_net()
    opt = info.build(model.named_parameters() if named_before else model.parameters())
    for i in range(3):
        forward_backward(model, opt, i)
        opt.step()
    twin_model = copy.deepcopy(model)
    twin = info.build(twin_model.named_parameters() if named_after else twin_model.parameters())
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(3, 5):
        for m, o in ((model, opt), (twin_model, twin)):
            forward_backward(m, o, i)
            o.step()
    assert_params_equal(list(model.parameters()), list(twin_model.parameters()))
    if named_before or named_after:
        names = [n for n, _ in model.named_parameters()]
        assert twin.state_dict()["param_groups"][0]["param_names"] == names


@PHASED
@FOREACH
@EACH
def test_scheduler_and_optimizer_resume_identically(
    info: Info, foreach: bool | None, phased: bool
) -> None:
    def build(model: nn.Module) -> tuple[Any, OneCycleLR]:
        opt = net_optimizer(info, model, foreach, phased)
        return opt, OneCycleLR(opt, max_lr=0.8, total_steps=8, cycle_momentum=False)

    torch.manual_seed(5)
    initial = small_net()
    straight = copy.deepcopy(initial)
    opt, sched = build(straight)
    for i in range(8):
        forward_backward(straight, opt, i)
        opt.step()
        sched.step()

    first = copy.deepcopy(initial)
    opt1, sched1 = build(first)
    for i in range(4):
        forward_backward(first, opt1, i)
        opt1.step()
        sched1.step()
    buffer = io.BytesIO()
    torch.save(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()},
        buffer,
    )
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)  # how Lightning resumes

    resumed = small_net()
    resumed.load_state_dict(ckpt["model"])
    opt2, sched2 = build(resumed)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for i in range(4, 8):
        forward_backward(resumed, opt2, i)
        opt2.step()
        sched2.step()
    assert_params_equal(list(straight.parameters()), list(resumed.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
    assert opt2.step_count == 8


# ----------------------------------------------------------------------------- 4. group keys


@EACH
def test_unknown_group_keys_are_accepted_and_round_trip(info: Info) -> None:
    def build(extra: bool) -> Any:
        torch.manual_seed(1)
        w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
        keys = [
            {"lr_scale": 0.5, "name": "weights", "my_key": {"tag": [1, 2]}},
            {"lr_scale": 1.0, "name": "biases"},
        ]
        groups = [{"params": [w]}, {"params": [b], "adapt": False}]
        if extra:
            for group, more in zip(groups, keys, strict=True):
                group.update(more)
        return info.build(groups)

    opt = build(extra=True)
    assert opt.param_groups[0]["lr_scale"] == 0.5 and opt.param_groups[1]["name"] == "biases"
    opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "layer_id": 3})
    assert opt.param_groups[2]["layer_id"] == 3
    set_grads(params_of(opt), 0)
    opt.step()
    saved = _sd_via_torch_save(opt.state_dict())
    fresh = build(extra=False)
    fresh.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))]})
    fresh.load_state_dict(saved)
    for key, value in (("lr_scale", 0.5), ("name", "weights"), ("my_key", {"tag": [1, 2]})):
        assert fresh.param_groups[0][key] == value
    assert fresh.param_groups[1]["name"] == "biases" and fresh.param_groups[2]["layer_id"] == 3
    set_grads(params_of(fresh), 1)
    fresh.step()
    assert fresh.step_count == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dampening", 0.1),
        ("differentiable", True),
        ("fused", True),
        ("amsgrad", True),
    ],
)
@EACH
def test_torch_options_it_does_not_implement_are_refused_by_name(
    info: Info, key: str, value: Any
) -> None:
    """A group carrying a torch.optim option that would silently do nothing is refused; the
    option at its neutral value (as copied from another optimizer's groups) is carried."""
    w = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=rf"{key}={value!r} is not supported by {info.name}"):
        info.build([{"params": [w], key: value}])
    neutral = {"dampening": 0, "differentiable": False, "fused": None, "amsgrad": False}
    assert info.build([{"params": [w], key: neutral[key]}]).param_groups[0][key] == neutral[key]


@EACH
def test_capturable_is_one_choice_for_the_whole_optimizer(info: Info) -> None:
    """``capturable`` (implemented: see test_capture.py) is optimizer-wide, as t is: a group that
    asks otherwise is refused by name; the same value (copied from torch's groups) is carried."""
    w = nn.Parameter(torch.randn(3, 2))
    for mine, theirs in ((False, True), (True, False)):
        with pytest.raises(ValueError, match=rf"capturable={theirs!r} in a group is invalid"):
            info.build([{"params": [w], "capturable": theirs}], capturable=mine)
        opt = info.build([{"params": [w], "capturable": mine}], capturable=mine)
        assert opt.param_groups[0]["capturable"] is mine and opt.capturable is mine
    with pytest.raises(TypeError, match="capturable='yes' is invalid"):
        info.build([w], capturable="yes")


@EACH
def test_bad_arguments_raise_errors_naming_them(info: Info) -> None:
    for kwargs, fragment in info.bad:
        with pytest.raises(ValueError, match="is invalid") as err:
            info.build([torch.zeros(2, 2, requires_grad=True)], **kwargs)
        assert fragment in str(err.value), (kwargs, str(err.value))
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="adapt='no'"):
        info.build([{"params": [p], "adapt": "no"}])
    with pytest.raises(TypeError, match="lr=True"):
        info.build([p], lr=True)
    with pytest.raises(TypeError, match="phase=3"):
        info.cls([p], lr=0.1, phase=3)  # type: ignore[arg-type]
    for lr in (torch.tensor([0.1]), torch.tensor(1), torch.tensor(0.1, requires_grad=True)):
        with pytest.raises(ValueError, match=r"0-d floating-point tensor without grad"):
            info.build([p], lr=lr)
    for lr in (torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match=r"lr=(0\.0|-1\.0|nan) is invalid"):
            info.build([p], lr=lr)
    with pytest.raises(TypeError, match="dense real tensors"):
        info.build([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])


@pytest.mark.parametrize("foreach", [True, False, None])
@EACH
def test_foreach_is_a_per_group_option_that_travels(info: Info, foreach: bool | None) -> None:
    w = nn.Parameter(torch.randn(3, 2))
    opt = info.build([w], foreach=foreach)
    assert opt.defaults["foreach"] is foreach and opt.param_groups[0]["foreach"] is foreach
    assert opt.state_dict()["param_groups"][0]["foreach"] is foreach
    twin = copy.deepcopy(opt)
    assert twin.defaults["foreach"] is foreach and twin.param_groups[0]["foreach"] is foreach
    fresh = info.build([nn.Parameter(torch.randn(3, 2))], foreach=not foreach)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["foreach"] is foreach


@EACH
def test_foreach_true_is_refused_where_torch_has_no_fused_kernels(
    info: Info, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As torch.optim refuses ``fused=True`` there; also when a group switches between steps."""
    monkeypatch.setattr(workspace, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    w = nn.Parameter(torch.randn(3, 2))
    w.grad = torch.randn(3, 2)
    opt = info.build([w])
    opt.step()  # foreach=None: the elementwise path
    opt.param_groups[0]["foreach"] = True
    with pytest.raises(ValueError, match=r"foreach=True.*\['cuda'\].*\['cpu'\]"):
        opt.step()


@PHASED
@EACH
def test_groups_may_choose_different_paths_in_one_optimizer(info: Info, phased: bool) -> None:
    params = [nn.Parameter(torch.randn(5, 4)) for _ in range(2)]
    params += [nn.Parameter(torch.randn(4)) for _ in range(2)]
    groups = [
        {"params": params[:1], "foreach": False, **info.adapted},
        {"params": params[1:2], "foreach": True, **info.adapted},
        {"params": params[2:3], "foreach": True, **info.excluded},
        {"params": params[3:], "foreach": False, **info.excluded},
    ]
    opt = info.build(groups, phased=phased)
    assert [g["foreach"] for g in opt.param_groups] == [False, True, True, False]
    oracle = info.oracle(opt, phased)
    for step in range(4):
        set_grads(params, step)
        oracle.step()
        opt.step()
    oracle.check()


# ----------------------------------------------------------------------------- 5. steps


@PHASED
@FOREACH
@EACH
def test_a_step_without_gradients_advances_t_and_describes_itself(
    info: Info, foreach: bool | None, phased: bool
) -> None:
    w = nn.Parameter(torch.randn(3, 2))
    opt = info.build([w], phased=phased, foreach=foreach)
    opt.step()  # no gradient at all, first step
    assert opt.step_count == 1
    stats = opt.last_step_stats
    assert stats is not None and stats.step == 0 and stats.params == () and bool(stats.skipped)
    w.grad = torch.randn(3, 2)
    opt.step()
    assert opt.last_step_stats.step == 1 and len(opt.last_step_stats.params) == 1
    w.grad = None
    before = w.detach().clone()
    opt.step()
    assert opt.step_count == 3 and all(g["step"] == 3 for g in opt.param_groups)
    stats = opt.last_step_stats
    assert stats.step == 2 and stats.params == () and bool(stats.skipped)
    assert torch.equal(w.detach(), before)


@PHASED
@FOREACH
@EACH
def test_parameters_without_gradient_are_left_untouched(
    info: Info, foreach: bool | None, phased: bool
) -> None:
    live = nn.Parameter(torch.randn(4, 3))
    frozen = nn.Parameter(torch.randn(4, 3), requires_grad=False)
    never = nn.Parameter(torch.randn(3))  # requires grad, never gets one
    paused = nn.Parameter(torch.randn(4, 3))  # no gradient on steps 2 and 3
    opt = info.build(
        [{"params": [live, frozen, never]}, {"params": [paused], **info.adapted}],
        phased=phased,
        foreach=foreach,
    )
    untouched = {id(p): p.detach().clone() for p in (frozen, never)}
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        live.grad = torch.randn(4, 3, generator=gen)
        paused.grad = None if step in (2, 3) else torch.randn(4, 3, generator=gen)
        if step == 2:
            paused_before = paused.detach().clone()
            paused_state = copy.deepcopy(opt.state[paused])
        opt.step()
        if step == 3:
            assert torch.equal(paused.detach(), paused_before)
            assert_same(opt.state[paused], paused_state)
    for p in (frozen, never):
        assert torch.equal(p.detach(), untouched[id(p)])
        assert p not in opt.state
    assert not torch.equal(paused.detach(), paused_before)  # resumed afterwards


@PHASED
@EACH
def test_foreach_matches_forloop_with_frozen_layers_and_odd_tensors(
    info: Info, phased: bool
) -> None:
    """torch's test_foreach_matches_forloop: 7 steps, a step with no gradients, a layer frozen for
    two steps, a 0-d parameter and a zero-size parameter last, in float64."""
    results = []
    for foreach in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).double()
        scalar = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        empty = nn.Parameter(torch.empty(0, 3, dtype=torch.float64))
        opt = info.build(
            [{"params": [*model.parameters(), scalar, empty], **info.adapted}],
            phased=phased,
            foreach=foreach,
        )
        x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64).reshape(3, 2)
        for i in range(7):
            opt.zero_grad()
            model[2].requires_grad_(i not in (3, 4))
            if i != 2:
                (model(x).sum() + scalar.square()).backward()
                empty.grad = torch.zeros_like(empty)
            opt.step()
        results.append(opt)
    for p, q in zip(params_of(results[0]), params_of(results[1]), strict=True):
        torch.testing.assert_close(p, q, **F64)
        for key in results[0].state[p]:
            torch.testing.assert_close(results[0].state[p][key], results[1].state[q][key], **F64)
    assert [o.step_count for o in results] == [7, 7]  # the step without gradients counts too


@FOREACH
@EACH
def test_empty_groups_and_groups_added_later(info: Info, foreach: bool | None) -> None:
    w = nn.Parameter(torch.randn(4, 3))
    opt = info.build([{"params": [w]}, {"params": []}], foreach=foreach)
    opt.add_param_group({"params": []})
    oracle = info.oracle(opt, False)
    for step in range(2):
        set_grads(params_of(opt), step)
        oracle.step()
        opt.step()
    b = nn.Parameter(torch.randn(3))
    v = nn.Parameter(torch.randn(2, 2))
    opt.add_param_group({"params": [b], **info.excluded})
    opt.add_param_group({"params": [v], **info.adapted})
    assert [g["step"] for g in opt.param_groups] == [2] * 5  # one clock for all groups
    for step in range(2, 5):
        set_grads(params_of(opt), step)
        oracle.step()
        opt.step()
    oracle.check()
    twin = info.build([{"params": [w]}, {"params": []}], foreach=foreach)
    twin.add_param_group({"params": []})
    twin.add_param_group({"params": [b], "adapt": False})
    twin.add_param_group({"params": [v]})
    twin.load_state_dict(opt.state_dict())
    assert twin.step_count == 5 and twin.param_groups[3]["lr"] == info.excluded["lr"]


@FOREACH
@EACH
def test_closure_runs_once_with_grad_enabled_and_its_loss_is_returned(
    info: Info, foreach: bool | None
) -> None:
    model = small_net()
    opt = net_optimizer(info, model, foreach, phased=True)
    calls: list[bool] = []
    losses: list[Tensor] = []

    def closure() -> Tensor:
        calls.append(torch.is_grad_enabled())
        loss = forward_backward(model, opt, len(calls))
        losses.append(loss)
        return loss

    with torch.no_grad():  # step() must enable grad for the closure itself
        result = opt.step(closure)
    assert calls == [True] and result is losses[0]
    assert opt.step(closure) is losses[1] and calls == [True, True]


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non_contiguous"])
@FOREACH
@EACH
def test_loss_goes_down(info: Info, foreach: bool | None, contiguous: bool) -> None:
    """torch's test_forloop_goes_right_direction."""
    if contiguous:
        weight, bias = nn.Parameter(torch.randn(10, 5)), nn.Parameter(torch.randn(10))
    else:
        weight = nn.Parameter(torch.randn(10, 5, 2)[..., 0])
        bias = nn.Parameter(torch.randn(10, 2)[..., 0])
    x = torch.randn(5)
    opt = info.build([{"params": [weight]}, {"params": [bias], **info.excluded}], foreach=foreach)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    assert closure().item() < initial


@FOREACH
@EACH
def test_maximize_ascends_as_descending_the_negated_loss(info: Info, foreach: bool | None) -> None:
    runs = []
    for maximize in (False, True):
        params = [
            nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(9))),
            nn.Parameter(torch.ones(3)),
        ]
        opt = info.build(info.two_groups(params), phased=True, foreach=foreach, maximize=maximize)
        for step in range(4):
            grads = set_grads(params, step)
            if maximize:
                for p, g in zip(params, grads, strict=True):
                    p.grad = -g
            opt.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, **F32)


@FOREACH
@EACH
def test_a_step_leaves_the_gradients_as_they_were(
    info: Info, foreach: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused kernels write into what they read: on every path that must be a workspace,
    never a gradient (with a gradient clip and weight decay too)."""
    monkeypatch.setattr(workspace, "CPU_BATCH", 1000)
    params = [nn.Parameter(torch.randn(s)) for s in [(40, 30), (7,), (5, 5, 3, 3)]]
    opt = info.build(info.two_groups(params), phased=True, foreach=foreach)
    for step in range(3):
        grads = set_grads(params, step)
        opt.step()
        for p, g in zip(params, grads, strict=True):
            assert torch.equal(p.grad, g)


@FOREACH
@EACH
def test_a_zero_phase_freezes_the_adapted_tensors(info: Info, foreach: bool | None) -> None:
    weights = [torch.randn(6, 5), torch.randn(4, 3, 3, 3), torch.randn(7)]
    params = [nn.Parameter(w.clone()) for w in weights]
    opt = info.cls(
        [{"params": params[:2], **info.adapted}, {"params": params[2:], **info.excluded}],
        **info.options,
        phase=lambda t: 0.0,
        foreach=foreach,
    )
    set_grads(params, 0)
    opt.step()
    assert torch.equal(params[0].detach(), weights[0])
    assert torch.equal(params[1].detach(), weights[1])
    assert not torch.equal(params[2].detach(), weights[2])  # not adapted: no phase


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@FOREACH
@EACH
def test_a_non_finite_gradient_skips_the_whole_step(
    info: Info, foreach: bool | None, bad: float
) -> None:
    model = small_net()
    opt = net_optimizer(info, model, foreach, phased=True)
    for i in range(2):
        forward_backward(model, opt, i)
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    forward_backward(model, opt, 2)
    model[0].weight.grad[0, 0] = bad
    opt.step()
    assert bool(opt.last_step_stats.skipped) and opt.step_count == 3
    assert_params_equal(list(model.parameters()), before, "skipped step")
    assert_same(opt.state_dict()["state"], state)
    forward_backward(model, opt, 3)  # the next finite step proceeds normally
    opt.step()
    assert not bool(opt.last_step_stats.skipped)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@FOREACH
@EACH
def test_zero_gradients_without_decay_leave_parameters_unchanged(
    info: Info, foreach: bool | None
) -> None:
    w, b = nn.Parameter(torch.randn(5, 1)), nn.Parameter(torch.randn(5))
    before = [w.detach().clone(), b.detach().clone()]
    opt = info.build(
        [{"params": [w], "weight_decay": 0.0}, {"params": [b], **info.excluded}], foreach=foreach
    )
    for _ in range(2):
        w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
        opt.step()
    assert_params_equal([w, b], before)


@EACH
def test_the_step_clock_matches_scaler_steps_and_the_lr_scheduler(info: Info) -> None:
    model = _amp_net()
    opt = net_optimizer(info, model, phased=True)
    sched = LambdaLR(opt, lambda e: 0.5**e)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(4):
        x, y = batch(i)
        opt.zero_grad(set_to_none=True)
        scaler.scale((model(x) - y).square().mean()).backward()
        if i == 1:
            _poison(model)
        scaler.step(opt)
        scaler.update()
        sched.step()
        assert opt.step_count == i + 1 == sched.last_epoch
        assert all(g["step"] == i + 1 for g in opt.param_groups)


@FOREACH
@EACH
def test_the_step_reads_no_device_value_on_the_host(info: Info, foreach: bool | None) -> None:
    model = small_net()
    opt = net_optimizer(info, model, foreach, phased=True)
    with no_host_reads_inside_step(opt) as reads:
        for i in range(3):
            forward_backward(model, opt, i)
            opt.step()
    assert reads == []
    assert opt.step_count == 3


# ----------------------------------------------------------------------------- 6. AMP


INF_STEP = 2


def _amp_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _poison(model: nn.Module) -> None:
    model[0].weight.grad[0, 0] = float("inf")


@EACH
def test_it_opts_in_to_grad_scaler_scaling_unless_sharded(info: Info) -> None:
    assert info.build([nn.Parameter(torch.randn(2, 2))])._step_supports_amp_scaling is True
    # sharded parameters (here an FSDP1 view, marked as FSDP marks it) leave unscaling to the
    # scaler: ShardedGradScaler keeps the ranks' found_inf in agreement only in unscale_
    sharded = nn.Parameter(torch.randn(4))
    sharded._fsdp_flattened = True  # type: ignore[attr-defined]
    assert info.build([sharded])._step_supports_amp_scaling is False


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
@PHASED
@FOREACH
@EACH
def test_grad_scaler_gives_the_unscaled_weights_and_skips_inf_steps(
    info: Info, foreach: bool | None, phased: bool, unscale_first: bool
) -> None:
    plain_model = _amp_net()
    plain = net_optimizer(info, plain_model, foreach, phased)
    weights, grads = [], []
    for i in range(5):
        forward_backward(plain_model, plain, i)
        if i == INF_STEP:
            _poison(plain_model)
        grads.append([p.grad.clone() for p in params_of(plain)])
        plain.step()  # skips the non-finite step itself, and t advances
        weights.append([p.detach().clone() for p in params_of(plain)])

    model = _amp_net()
    opt = net_optimizer(info, model, foreach, phased)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with no_host_reads_inside_step(opt) as reads:
        for i in range(5):
            x, y = batch(i)
            opt.zero_grad(set_to_none=True)
            scaler.scale((model(x) - y).square().mean()).backward()
            if i == INF_STEP:
                _poison(model)
                state = copy.deepcopy(opt.state_dict()["state"])
            if unscale_first:
                scaler.unscale_(opt)  # e.g. to clip gradients
            scaler.step(opt)
            scaler.update()
            assert opt.step_count == i + 1, "t must count every scaler.step"
            assert_params_equal(params_of(opt), weights[i], f"step {i}")
            if i == INF_STEP:
                assert_same(opt.state_dict()["state"], state)
                assert scaler.get_scale() == 2.0**9
            else:
                for k, (p, g) in enumerate(zip(params_of(opt), grads[i], strict=True)):
                    assert torch.equal(p.grad, g), f"step {i}: grad {k} is not the unscaled one"
    assert reads == []


# ----------------------------------------------------------------------------- 7. torch's tools


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: StepLR(o, step_size=2, gamma=0.5),
    "LambdaLR": lambda o: LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "CosineAnnealingLR": lambda o: CosineAnnealingLR(o, T_max=5, eta_min=0.01),
    "OneCycleLR": lambda o: OneCycleLR(
        o, max_lr=[0.6, 0.3], total_steps=8, base_momentum=0.8, max_momentum=0.95
    ),
    "ReduceLROnPlateau": lambda o: ReduceLROnPlateau(o, factor=0.5, patience=0),
    "SequentialLR": lambda o: SequentialLR(
        o, [LinearLR(o, start_factor=0.25, total_iters=3), ExponentialLR(o, gamma=0.8)], [3]
    ),
    "ChainedScheduler": lambda o: ChainedScheduler(
        [ConstantLR(o, factor=0.5, total_iters=2), ExponentialLR(o, gamma=0.9)]
    ),
    "SWALR": lambda o: SWALR(o, swa_lr=0.05, anneal_epochs=3, anneal_strategy="cos"),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
@FOREACH
@EACH
def test_lr_schedulers_drive_it_as_they_drive_sgd(
    info: Info, name: str, foreach: bool | None
) -> None:
    torch.manual_seed(2)
    weight, bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    opt = info.build(
        [
            {"params": [weight], "lr": 0.2, **info.adapted},
            {"params": [bias], **info.excluded, "lr": 0.1},
        ],
        phased=True,
        foreach=foreach,
    )
    sgd = torch.optim.SGD(
        [
            {"params": [nn.Parameter(torch.randn(4, 3))], "lr": 0.2},
            {"params": [nn.Parameter(torch.randn(3))], "lr": 0.1},
        ],
        lr=0.2,
    )
    scheds = [SCHEDULERS[name](opt), SCHEDULERS[name](sgd)]
    oracle = info.oracle(opt, True)
    lrs = []
    for i in range(8):
        for o in (opt, sgd):
            set_grads(params_of(o), i)
        oracle.step()  # with the lr the scheduler set for this step
        opt.step()
        sgd.step()
        for sched in scheds:
            sched.step(1.0) if isinstance(sched, ReduceLROnPlateau) else sched.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in sgd.param_groups]
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, "the schedule never moved"
    oracle.check()
    if name == "OneCycleLR":  # cycle_momentum=True moved the momentum (LAMB: beta1)
        group = opt.param_groups[0]
        assert (group["momentum"] if "momentum" in group else group["betas"][0]) != 0.9


@FOREACH
@EACH
def test_swa_utils_average_a_run(info: Info, foreach: bool | None) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    opt = info.build(lightning_tvlars.param_groups(model, weight_decay=1e-3), foreach=foreach)
    swa_model = AveragedModel(model)
    swa_sched = SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    x = torch.randn(16, 4)
    snapshots = []
    for i in range(4):
        opt.zero_grad()
        model(x + i).square().mean().backward()
        opt.step()
        swa_model.update_parameters(model)
        swa_sched.step()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    for k, p in enumerate(swa_model.module.parameters()):
        mean = torch.stack([s[k] for s in snapshots]).mean(0)
        torch.testing.assert_close(p.detach(), mean, **F32)
    update_bn([x], swa_model)
    features = swa_model.module[0](x).detach()
    torch.testing.assert_close(swa_model.module[1].running_mean, features.mean(0), **F32)


@EACH
def test_step_hooks_and_state_dict_hooks_run(info: Info) -> None:
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    w = nn.Parameter(torch.randn(3, 2))
    opt = info.build([w])
    calls: list[str] = []

    def hook(tag: str) -> Callable[..., None]:
        def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            calls.append(tag)

        return record

    handles = [
        register_optimizer_step_pre_hook(hook("global_pre")),
        register_optimizer_step_post_hook(hook("global_post")),
        opt.register_step_pre_hook(hook("pre")),
        opt.register_step_post_hook(hook("post")),
    ]
    try:
        w.grad = torch.randn(3, 2)
        opt.step()
        assert calls == ["global_pre", "pre", "post", "global_post"]
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    assert len(calls) == 4

    seen: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("post"))
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(lambda o, s: s["param_groups"][0].update(lr=0.002))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(f"lr={o.param_groups[0]['lr']}"))
    opt.load_state_dict(sd)
    assert seen == ["pre", "post", "lr=0.002"]


@EACH
def test_zero_grad_sets_to_none_or_zeroes_in_place(info: Info) -> None:
    model = small_net()
    opt = net_optimizer(info, model)
    forward_backward(model, opt, 0)
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is g and torch.count_nonzero(g) == 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- 8. statistics


@EACH
def test_last_step_stats_describe_the_step(info: Info) -> None:
    model = small_net()
    groups = lightning_tvlars.param_groups(model, weight_decay=1e-2)
    opt = info.build(groups, phased=True)
    for i in range(2):
        forward_backward(model, opt, i)
        opt.step()
    stats = opt.last_step_stats
    assert stats is not None and stats.step == 1 and stats.phase == opt.phase(1)
    named = {id(p): n for g in groups for p, n in zip(g["params"], g["param_names"], strict=True)}
    assert sorted(stats.names) == sorted(named.values())
    assert [named[id(p)] for p in stats.params] == list(stats.names)
    assert stats.weight_norm.dtype == torch.float32 and stats.weight_norm.shape == (
        len(stats.names),
    )
    adapted = torch.tensor(stats.adapted)
    assert torch.all(stats.trust_ratio[~adapted] == 1.0)
    assert torch.all(stats.trust_ratio[adapted] != 1.0)
    assert not stats.skipped
    # the weight norms were taken before the update of that step
    assert not torch.allclose(
        stats.weight_norm, torch.stack([p.detach().float().norm() for p in stats.params])
    )


@EACH
def test_stats_do_not_keep_gradients_alive(info: Info) -> None:
    import gc
    import weakref

    w = torch.ones(100, requires_grad=True)
    opt = info.build([w])
    w.grad = g = torch.ones(100)
    ref = weakref.ref(g)
    opt.step()
    opt.zero_grad(set_to_none=True)
    del g
    gc.collect()
    assert ref() is None


@FOREACH
@EACH
def test_a_sparse_gradient_is_refused_naming_the_optimizer(
    info: Info, foreach: bool | None
) -> None:
    w = nn.Parameter(torch.randn(3, 2))
    opt = info.build([w], foreach=foreach)
    w.grad = torch.randn(3, 2).to_sparse()
    with pytest.raises(TypeError, match=rf"{info.name} does not support sparse gradients"):
        opt.step()
    assert opt.step_count == 0
