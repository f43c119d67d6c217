"""The torch.optim contract for TVLARS (issue #11).

Ported in spirit (not in code) from the generic optimizer tests of PyTorch
(``test/test_optim.py``, ``test/optim/test_lrscheduler.py``, ``test/optim/test_swa_utils.py``,
the OptimizerInfo inputs of ``torch/testing/_internal/common_optimizers.py`` and the GradScaler
tests) and of timm (``tests/test_optim.py``, ``timm/optim/_param_groups.py``,
``timm/optim/_optim_factory.py``): everything that applies to a third-party optimizer.
Updates are checked against ``reference_impl.PlainTVLARS``, an independent float64 oracle.

Not ported, on purpose: complex and sparse parameters (TVLARS refuses them), ``maximize``,
``differentiable``, ``capturable`` and ``fused`` flags (TVLARS has none), LBFGS-style closures,
the sparse Rosenbrock test, and the CUDA-only ones (multi-GPU, large tensors, peak memory).
Many tests fail on the implementation before the rewrite of issue #11; that is their purpose.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from reference_impl import PlainTVLARS
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
from lightning_tvlars import TVLARS, SigmoidPhase
from lightning_tvlars.optim import NORM_LAYERS

# The phase of these tests: phi moves a lot over a few steps (1/(1+e^-0.6) = 0.65 at t = 0,
# 0.5 at t = 2), so a copy or a resume that loses t or the phase shows in the weights.
PHASE_ARGS = {"decay": 0.3, "delay": 2.0}
PHASE_TUPLE = (1.0, 0.3, 2.0, 0.0)  # (alpha, decay, delay, floor) for PlainTVLARS

FOREACH = pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "forloop"])
PHASED = pytest.mark.parametrize("phased", [True, False], ids=["phase", "nophase"])

# Tolerances against the float64 oracle.
# float32: every step rounds the weight, the momentum buffer and the scaled update to float32
# (relative error ~6e-8 each) and takes float32 norms for the trust ratio (~1e-7); over the
# <= 6 steps of these tests the drift stays two orders of magnitude below rtol=1e-5. atol covers
# entries that pass close to zero.
F32 = {"rtol": 1e-5, "atol": 1e-6}
# float64: same algorithm, same precision as the oracle; only the summation order of the norms
# and of the fused kernel differ (a few ulps).
F64 = {"rtol": 1e-10, "atol": 1e-12}
# bfloat16: 8 significant bits; each step rounds w to bf16 (<= 2^-9 relative), the oracle keeps
# float64 weights, so after 4 steps the gap is <= 4 * 2^-9 = 0.8% of |w| plus the rounding of
# the bf16 buffer; rtol=1.6e-2 (torch's default for bf16) leaves a factor of 2, atol=1e-2 covers
# entries near zero whose ulp is set by the update, not by the weight.
BF16 = {"rtol": 1.6e-2, "atol": 1e-2}
TOL = {torch.float32: F32, torch.float64: F64, torch.bfloat16: BF16}

# Host reads a step must not make (each one is a device synchronisation on an accelerator).
HOST_READS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__")


# ----------------------------------------------------------------------------- helpers


def make_phase(phased: bool) -> SigmoidPhase | None:
    return SigmoidPhase(**PHASE_ARGS) if phased else None


def phase_tuple(phased: bool) -> tuple[float, float, float, float] | None:
    return PHASE_TUPLE if phased else None


def params_of(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def random_like(p: Tensor, gen: torch.Generator) -> Tensor:
    """Standard normal values of ``p``'s shape and dtype (drawn in float32 for every dtype)."""
    return torch.randn(p.shape, generator=gen).to(p.dtype)


def set_grads(params: list[Tensor], step: int, seed: int = 0) -> list[Tensor]:
    """Give every parameter a deterministic gradient (contiguous) for ``step``; returns them."""
    gen = torch.Generator().manual_seed(10_000 * seed + step)
    grads = [random_like(p, gen) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return grads


def hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A TVLARS group's hyper-parameters as PlainTVLARS spells them."""
    return {
        "lr": float(group["lr"]),
        "momentum": float(group["momentum"]),
        "weight_decay": float(group["weight_decay"]),
        "eta": float(group["trust_coefficient"]),
        "clip": group["norm_clip"],
        "adapt": group["adapt"],
    }


class Oracle:
    """PlainTVLARS (float64) shadowing an optimizer.

    Before each step it copies the groups' current hyper-parameters (LR schedulers change them)
    and picks up groups added with ``add_param_group``. Every parameter must have a gradient.
    """

    def __init__(self, opt: TVLARS, phased: bool) -> None:
        self.opt = opt
        self.shadow: dict[int, Tensor] = {}
        self.ref = PlainTVLARS([self._group(g) for g in opt.param_groups], phase_tuple(phased))

    def _group(self, group: dict[str, Any]) -> dict[str, Any]:
        params = []
        for p in group["params"]:
            self.shadow[id(p)] = p.detach().to(torch.float64, copy=True).contiguous()
            params.append(self.shadow[id(p)])
        return {"params": params, **hyper(group)}

    def step(self) -> None:
        groups = self.opt.param_groups
        for ref_group, group in zip(self.ref.groups, groups, strict=False):
            ref_group.update(hyper(group))
        for group in groups[len(self.ref.groups) :]:
            self.ref.groups.append(self._group(group))
        grads = {id(self.shadow[id(p)]): p.grad.double() for p in params_of(self.opt)}
        self.ref.step(grads)

    def check(self, buffers: bool = False) -> None:
        for i, p in enumerate(params_of(self.opt)):
            tol = TOL[p.dtype]
            expected = self.shadow[id(p)]
            torch.testing.assert_close(
                p.detach().double(), expected, **tol, msg=lambda m, i=i: f"param {i}: {m}"
            )
            if buffers and id(expected) in self.ref.buffers:
                buf = self.opt.state[p]["momentum_buffer"]
                # buffers are ~phi * r * u (r ~ 1e-2): an absolute floor 10x below F32's
                torch.testing.assert_close(
                    buf.double(),
                    self.ref.buffers[id(expected)],
                    rtol=tol["rtol"],
                    atol=tol["atol"] / 10,
                    msg=lambda m, i=i: f"momentum buffer {i}: {m}",
                )


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Nested equality of state dicts: tensors bit for bit, everything else with ==."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_params_equal(a: list[Tensor], b: list[Tensor], what: str = "") -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x.detach(), y.detach()), f"{what} param {i} differs"


def assert_buffers_equal(opt_a: TVLARS, opt_b: TVLARS) -> None:
    for i, (p, q) in enumerate(zip(params_of(opt_a), params_of(opt_b), strict=True)):
        a, b = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert set(a) == set(b), f"state keys of param {i}"
        for key in a:
            assert_same(a[key], b[key], f"state[{i}].{key}")


def small_net() -> nn.Module:
    """Weights, biases and a LayerNorm: an adapted and an excluded group."""
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))


def batch(i: int, n: int = 8, d: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(500 + i)
    return torch.randn(n, d, generator=gen), torch.randn(n, 3, generator=gen)


def forward_backward(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> Tensor:
    x, y = batch(i)
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - y).square().mean()
    loss.backward()
    return loss


def net_optimizer(model: nn.Module, foreach: bool | None, phased: bool, **kwargs: Any) -> TVLARS:
    groups = lightning_tvlars.param_groups(model, weight_decay=1e-2)
    options = {"lr": 0.5, "trust_coefficient": 0.02, **kwargs}
    return TVLARS(groups, phase=make_phase(phased), foreach=foreach, **options)


@contextlib.contextmanager
def no_host_reads_inside_step(opt: torch.optim.Optimizer) -> Iterator[list[str]]:
    """Make every host read of a tensor raise while ``opt.step`` runs (hooks arm and disarm).

    Yields the names of the reads attempted (also caught if the step swallowed the error).
    """
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    reads: list[str] = []

    def forbidden(name: str) -> Callable[..., Any]:
        def read(*args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            raise AssertionError(f"Tensor.{name} inside the optimizer step: a host read")

        return read

    def arm(*_: Any) -> None:
        for name in HOST_READS:
            setattr(torch.Tensor, name, forbidden(name))

    def disarm(*_: Any) -> None:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

    handles = [opt.register_step_pre_hook(arm), opt.register_step_post_hook(disarm)]
    try:
        yield reads
    finally:
        disarm()
        for handle in handles:
            handle.remove()


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


def _flat(shapes: list[tuple[int, ...]], gap: int, gen: torch.Generator | None = None):
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


def _two_groups(params: list[Tensor]) -> list[dict[str, Any]]:
    """First half adapted (with weight decay), second half plain momentum SGD."""
    half = len(params) // 2
    return [
        {"params": params[:half], "weight_decay": 1e-2, "trust_coefficient": 0.05},
        {"params": params[half:], "adapt": False, "lr": 0.1, "momentum": 0.8},
    ]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@PHASED
@FOREACH
def test_every_memory_layout_matches_the_reference(
    layout: str, foreach: bool, phased: bool
) -> None:
    case = LAYOUTS[layout]()
    outside_before = [o.clone() for o in case.outside]
    ptrs = [p.data_ptr() for p in case.params]
    opt = TVLARS(_two_groups(case.params), lr=1.0, phase=make_phase(phased), foreach=foreach)
    oracle = Oracle(opt, phased)
    for step in range(4):
        grads, grad_outside = case.grads(step)
        grad_outside_before = [o.clone() for o in grad_outside]
        for p, g in zip(case.params, grads, strict=True):
            p.grad = g
        oracle.step()
        opt.step()
        for i, (o, before) in enumerate(zip(grad_outside, grad_outside_before, strict=True)):
            assert torch.equal(o, before), f"step {step} wrote outside gradient {i}"
    oracle.check(buffers=True)
    for i, (o, before) in enumerate(zip(case.outside, outside_before, strict=True)):
        assert torch.equal(o, before), f"bytes outside the parameters were written ({i})"
    # updated in place: still the same memory, still visible through the base tensors
    assert [p.data_ptr() for p in case.params] == ptrs
    views = case.views_of_bases()
    for view, p in zip(views, case.params if views else [], strict=True):
        assert torch.equal(view, p.detach())
    for p in case.params:
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape and buf.dtype == p.dtype


@FOREACH
def test_zero_dim_tensors_in_an_adapted_group_get_the_trust_ratio(foreach: bool) -> None:
    w = nn.Parameter(torch.tensor(2.0))
    w.grad = torch.tensor(4.0)
    opt = TVLARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.1, foreach=foreach)
    opt.step()
    # u = 4, r = 0.1 * 2 / 4 = 0.05: w = 2 - 0.05 * 4 = 1.8 (plain SGD would give -2)
    torch.testing.assert_close(w.detach(), torch.tensor(1.8))
    assert opt.last_step_stats.adapted == (True,)


# ----------------------------------------------------------------------------- 2. copies


def _copy_deepcopy(model: nn.Module, opt: TVLARS) -> tuple[nn.Module | None, TVLARS]:
    return None, copy.deepcopy(opt)


def _copy_pickle(model: nn.Module, opt: TVLARS) -> tuple[nn.Module | None, TVLARS]:
    return pickle.loads(pickle.dumps((model, opt)))


def _copy_torch_save(model: nn.Module, opt: TVLARS) -> tuple[nn.Module | None, TVLARS]:
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": _copy_deepcopy, "pickle": _copy_pickle, "torch_save": _copy_torch_save}


@pytest.mark.parametrize("how", list(COPIES))
@PHASED
@FOREACH
def test_a_copy_steps_exactly_like_the_original(how: str, foreach: bool, phased: bool) -> None:
    model = small_net()
    opt = net_optimizer(model, foreach, phased)
    for step in range(3):
        set_grads(params_of(opt), step)
        opt.step()
    model_copy, twin = COPIES[how](model, opt)
    assert type(twin) is TVLARS
    assert twin.step_count == opt.step_count == 3
    if model_copy is not None:  # pickled together: the copy still optimizes the copied model
        assert sorted(map(id, params_of(twin))) == sorted(map(id, model_copy.parameters()))
    for step in range(3, 7):
        for o in (opt, twin):
            set_grads(params_of(o), step)
            o.step()
        assert_params_equal(params_of(opt), params_of(twin), f"after step {step}")
        assert_buffers_equal(opt, twin)
    assert twin.step_count == opt.step_count == 7


def test_deepcopy_keeps_every_public_attribute() -> None:
    model = small_net()
    opt = net_optimizer(model, foreach=False, phased=True)
    set_grads(params_of(opt), 0)
    opt.step()

    def public(o: object) -> dict[str, Any]:
        return {k: v for k, v in vars(o).items() if not k.startswith("_")}

    twin = copy.deepcopy(opt)
    assert set(public(twin)) == set(public(opt))
    # torch's own __setstate__ may add flags it knows (``differentiable``); ours must survive
    assert all(twin.defaults.get(k) == v for k, v in opt.defaults.items())


# ----------------------------------------------------------------------------- 3. group keys


def test_unknown_group_keys_are_accepted_and_round_trip() -> None:
    def build(extra: bool) -> tuple[list[Tensor], TVLARS]:
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
        return [w, b], TVLARS(groups, lr=0.1)

    _, opt = build(extra=True)
    assert opt.param_groups[0]["lr_scale"] == 0.5 and opt.param_groups[1]["name"] == "biases"
    assert opt.param_groups[0]["my_key"] == {"tag": [1, 2]}
    opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "layer_id": 3})
    assert opt.param_groups[2]["layer_id"] == 3
    set_grads(params_of(opt), 0)
    opt.step()

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["param_groups"][0]["lr_scale"] == 0.5
    assert saved["param_groups"][0]["my_key"] == {"tag": [1, 2]}

    _, fresh = build(extra=False)
    fresh.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))]})
    fresh.load_state_dict(saved)
    for key, value in (("lr_scale", 0.5), ("name", "weights"), ("my_key", {"tag": [1, 2]})):
        assert fresh.param_groups[0][key] == value
    assert fresh.param_groups[1]["name"] == "biases" and fresh.param_groups[2]["layer_id"] == 3
    set_grads(params_of(fresh), 1)
    fresh.step()
    assert fresh.step_count == 2


def _vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=4,
    )


def _vit_backward(model: nn.Module, i: int) -> None:
    gen = torch.Generator().manual_seed(700 + i)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _cosine(base: float, t: int, t_initial: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * t / t_initial))


def _timm_cosine(opt: TVLARS, factory: str) -> Any:
    import timm.scheduler

    if factory == "create_scheduler_v2":
        sched, epochs = timm.scheduler.create_scheduler_v2(opt, sched="cosine", num_epochs=5)
        assert epochs == 5
        return sched
    return timm.scheduler.CosineLRScheduler(opt, t_initial=5, lr_min=0.0)


@pytest.mark.parametrize("factory", ["CosineLRScheduler", "create_scheduler_v2"])
@FOREACH
def test_timm_layer_decay_groups_and_scheduler_apply_lr_scale(foreach: bool, factory: str) -> None:
    import timm.optim

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
    import timm.optim

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

    opt = TVLARS(groups, lr=0.1)
    sched = _timm_cosine(opt, "CosineLRScheduler")
    for epoch in range(2):
        _vit_backward(model, epoch)
        opt.step()
        sched.step(epoch + 1)
        for group in opt.param_groups:
            expected = _cosine(0.1, epoch + 1, 5) * group["lr_scale"]
            assert math.isclose(group["lr"], expected, rel_tol=1e-12)


@pytest.mark.parametrize("layer_decay", [None, 0.75], ids=["no_layer_decay", "layer_decay"])
def test_timm_creates_tvlars_by_name(layer_decay: float | None) -> None:
    import timm.optim

    from lightning_tvlars.optim.timm_registry import register_with_timm

    register_with_timm()
    register_with_timm()  # idempotent
    assert timm.optim.list_optimizers("tvlars") == ["tvlars"]

    model = _vit()
    no_decay_names = set(model.no_weight_decay())
    opt = timm.optim.create_optimizer_v2(
        model, opt="tvlars", lr=0.1, weight_decay=0.05, layer_decay=layer_decay, foreach=False
    )
    assert isinstance(opt, TVLARS)
    assert opt.defaults["foreach"] is False
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


# ----------------------------------------------------------------------------- 4. AMP


def test_tvlars_opts_in_to_grad_scaler_scaling() -> None:
    opt = TVLARS([nn.Parameter(torch.randn(2, 2))], lr=0.1)
    assert opt._step_supports_amp_scaling is True  # what GradScaler reads
    # sharded parameters (here an FSDP1 view, marked as FSDP marks it) leave unscaling to the
    # scaler: ShardedGradScaler keeps the ranks' found_inf in agreement only in unscale_
    sharded = nn.Parameter(torch.randn(4))
    sharded._fsdp_flattened = True  # type: ignore[attr-defined]
    assert TVLARS([sharded], lr=0.1)._step_supports_amp_scaling is False


INF_STEP = 2


def _amp_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _amp_loss(model: nn.Module, i: int) -> Tensor:
    x, y = batch(i)
    return (model(x) - y).square().mean()


def _poison(model: nn.Module) -> None:
    model[0].weight.grad[0, 0] = float("inf")


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
@PHASED
@FOREACH
def test_grad_scaler_gives_the_unscaled_weights_and_skips_inf_steps(
    foreach: bool, phased: bool, unscale_first: bool
) -> None:
    plain_model = _amp_net()
    plain = net_optimizer(plain_model, foreach, phased)
    weights, grads = [], []
    for i in range(5):
        plain.zero_grad(set_to_none=True)
        _amp_loss(plain_model, i).backward()
        if i == INF_STEP:
            _poison(plain_model)
        grads.append([p.grad.clone() for p in params_of(plain)])
        plain.step()  # TVLARS skips the non-finite step itself, and t advances
        weights.append([p.detach().clone() for p in params_of(plain)])

    model = _amp_net()
    opt = net_optimizer(model, foreach, phased)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(5):
        opt.zero_grad(set_to_none=True)
        scaler.scale(_amp_loss(model, i)).backward()
        if i == INF_STEP:
            _poison(model)
            before = [p.detach().clone() for p in params_of(opt)]
            buffers = [opt.state[p]["momentum_buffer"].clone() for p in params_of(opt)]
        if unscale_first:
            scaler.unscale_(opt)  # e.g. to clip gradients
        scaler.step(opt)
        scaler.update()
        assert opt.step_count == i + 1, "t must count every scaler.step"
        assert all(g["step"] == i + 1 for g in opt.param_groups)
        assert_params_equal(params_of(opt), weights[i], f"step {i}")
        if i == INF_STEP:
            assert_params_equal(params_of(opt), before, "skipped step")
            for p, buf in zip(params_of(opt), buffers, strict=True):
                assert torch.equal(opt.state[p]["momentum_buffer"], buf)
            assert scaler.get_scale() == 2.0**9
        else:
            for k, (p, g) in enumerate(zip(params_of(opt), grads[i], strict=True)):
                assert torch.equal(p.grad, g), f"step {i}: grad {k} is not the unscaled gradient"


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
@FOREACH
def test_grad_scaler_step_reads_nothing_on_the_host(foreach: bool, unscale_first: bool) -> None:
    model = _amp_net()
    opt = net_optimizer(model, foreach, phased=True, norm_clip=10.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with no_host_reads_inside_step(opt) as reads:
        for i in range(4):
            opt.zero_grad(set_to_none=True)
            scaler.scale(_amp_loss(model, i)).backward()
            if i == INF_STEP:
                _poison(model)
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    assert reads == []


def test_step_clock_matches_scaler_steps_and_the_lr_scheduler() -> None:
    model = _amp_net()
    opt = net_optimizer(model, foreach=None, phased=True)
    sched = LambdaLR(opt, lambda e: 0.5**e)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        scaler.scale(_amp_loss(model, i)).backward()
        if i == 1:
            _poison(model)
        scaler.step(opt)
        scaler.update()
        sched.step()
        assert opt.step_count == i + 1 == sched.last_epoch
        assert all(g["step"] == i + 1 for g in opt.param_groups)


# ----------------------------------------------------------------------------- 5. smaller items


def test_reference_preset_overrides_apply_to_every_group() -> None:
    model = small_net()
    opt = TVLARS.reference(model, lr=1.0, decay=1e-3, weight_decay=0.0, momentum=0.5)
    assert len(opt.param_groups) == 2
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert all(g["momentum"] == 0.5 for g in opt.param_groups)
    from_tensors = TVLARS.reference(list(model.parameters()), lr=1.0, decay=1e-3, weight_decay=0.0)
    assert all(g["weight_decay"] == 0.0 for g in from_tensors.param_groups)
    default = TVLARS.reference(model, lr=1.0, decay=1e-3)
    assert [g["weight_decay"] for g in default.param_groups] == [5e-4, 0.0]


@PHASED
@FOREACH
def test_a_step_without_gradients_advances_t_and_describes_itself(
    foreach: bool, phased: bool
) -> None:
    w = nn.Parameter(torch.randn(3, 2))
    opt = TVLARS([w], lr=0.1, phase=make_phase(phased), foreach=foreach)
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
    assert stats.step == 2, "stale statistics of the previous step"
    assert stats.params == () and bool(stats.skipped)
    assert torch.equal(w.detach(), before)


def test_tensor_lr_is_refused_with_a_clear_message() -> None:
    w = nn.Parameter(torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"(?i)tensor") as err:
        TVLARS([w], lr=torch.tensor(0.1))
    message = str(err.value).lower()
    assert "lr" in message and "not supported" in message


@pytest.mark.parametrize("foreach", [True, False, None])
def test_foreach_is_a_per_group_option_that_travels(foreach: bool | None) -> None:
    w = nn.Parameter(torch.randn(3, 2))
    opt = TVLARS([w], lr=0.1, foreach=foreach)
    assert "foreach" in opt.defaults and opt.defaults["foreach"] is foreach
    assert opt.param_groups[0]["foreach"] is foreach
    assert opt.state_dict()["param_groups"][0]["foreach"] is foreach
    twin = copy.deepcopy(opt)
    assert twin.defaults["foreach"] is foreach and twin.param_groups[0]["foreach"] is foreach
    fresh = TVLARS([nn.Parameter(torch.randn(3, 2))], lr=0.1, foreach=not foreach)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["foreach"] is foreach


def test_foreach_true_is_refused_where_torch_has_no_fused_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As torch.optim refuses ``fused=True`` there; also when a group switches between steps."""
    import lightning_tvlars.optim.workspace as update

    monkeypatch.setattr(update, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    w = nn.Parameter(torch.randn(3, 2))
    w.grad = torch.randn(3, 2)
    opt = TVLARS([w], lr=0.1)
    opt.step()  # foreach=None: the per-tensor path
    opt.param_groups[0]["foreach"] = True
    with pytest.raises(ValueError, match=r"foreach=True.*\['cuda'\].*\['cpu'\]"):
        opt.step()


@PHASED
def test_groups_may_choose_different_paths_in_one_optimizer(phased: bool) -> None:
    params = [nn.Parameter(torch.randn(5, 4)) for _ in range(2)]
    params += [nn.Parameter(torch.randn(4)) for _ in range(2)]
    groups = [
        {"params": params[:1], "foreach": False, "weight_decay": 1e-2},
        {"params": params[1:2], "foreach": True, "weight_decay": 1e-2},
        {"params": params[2:3], "foreach": True, "adapt": False},
        {"params": params[3:], "foreach": False, "adapt": False},
    ]
    opt = TVLARS(groups, lr=0.5, trust_coefficient=0.05, phase=make_phase(phased))
    assert [g["foreach"] for g in opt.param_groups] == [False, True, True, False]
    oracle = Oracle(opt, phased)
    for step in range(4):
        set_grads(params, step)
        oracle.step()
        opt.step()
    oracle.check(buffers=True)


def test_split_by_ndim_adapts_and_decays_zero_dim_tensors() -> None:
    from lightning_tvlars.optim.groups import split_by_ndim

    matrix, vector, scalar = torch.zeros(2, 2), torch.zeros(3), torch.zeros(())
    groups = split_by_ndim([matrix, vector, scalar], 1e-3)
    adapted = [p for g in groups if g["adapt"] for p in g["params"]]
    excluded = [p for g in groups if not g["adapt"] for p in g["params"]]
    assert [id(p) for p in adapted] == [id(matrix), id(scalar)]
    assert [id(p) for p in excluded] == [id(vector)]
    assert all(g["weight_decay"] == (1e-3 if g["adapt"] else 0.0) for g in groups)
    opt = TVLARS.reference([matrix, vector, scalar], lr=1.0, decay=1e-3)
    assert any(any(p is scalar for p in g["params"]) and g["adapt"] for g in opt.param_groups)


# ----------------------------------------------------------------------------- 6. generic


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
def test_state_dict_round_trip_continues_bit_for_bit(
    transport: str, foreach: bool, phased: bool
) -> None:
    model = small_net()
    opt = net_optimizer(model, foreach, phased)

    def closure(m: nn.Module, o: TVLARS, i: int) -> Callable[[], Tensor]:
        return lambda: forward_backward(m, o, i)

    for i in range(5):
        opt.step(closure(model, opt, i))
    twin_model = copy.deepcopy(model)
    twin = net_optimizer(twin_model, foreach, phased)
    twin.load_state_dict(TRANSPORTS[transport](opt.state_dict()))
    assert twin.step_count == 5
    for i in range(5, 10):
        opt.step(closure(model, opt, i))
        twin.step(closure(twin_model, twin, i))
        assert_params_equal(list(model.parameters()), list(twin_model.parameters()), f"step {i}")
    # deterministic with equal (not identical) parameters
    assert_same(opt.state_dict(), twin.state_dict())
    assert all(len(s) > 0 for s in opt.state.values())  # state only for stepped parameters


def _is_t(x: Any) -> bool:
    return isinstance(x, Tensor)


def test_state_dict_layout_is_stable() -> None:
    model = small_net()
    opt = net_optimizer(model, foreach=None, phased=True)
    forward_backward(model, opt, 0)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    n = len(params_of(opt))
    assert ids == list(range(n))
    assert set(sd["state"]) <= set(ids)
    assert all(isinstance(k, int) for k in sd["state"])
    assert_same(sd, opt.state_dict())  # asking twice gives the same answer
    assert repr(opt).startswith("TVLARS (")


def test_state_dict_without_newer_flags_still_loads() -> None:
    """torch's test_can_load_older_state_dict: checkpoints from before a flag existed."""
    model = small_net()
    opt = net_optimizer(model, foreach=False, phased=True)
    for i in range(2):
        forward_backward(model, opt, i)
        opt.step()
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        group.pop("foreach", None)
    opt.load_state_dict(old)
    forward_backward(model, opt, 2)
    opt.step()
    assert opt.step_count == 3


@pytest.mark.parametrize("named_before", [True, False])
@pytest.mark.parametrize("named_after", [True, False])
def test_named_and_unnamed_state_dicts_load_into_each_other(
    named_before: bool, named_after: bool
) -> None:
    model = small_net()
    opt = TVLARS(model.named_parameters() if named_before else model.parameters(), lr=0.1)
    for i in range(3):
        forward_backward(model, opt, i)
        opt.step()
    twin_model = copy.deepcopy(model)
    twin = TVLARS(twin_model.named_parameters() if named_after else twin_model.parameters(), lr=0.1)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(3, 5):
        for m, o in ((model, opt), (twin_model, twin)):
            forward_backward(m, o, i)
            o.step()
    assert_params_equal(list(model.parameters()), list(twin_model.parameters()))
    if named_before or named_after:
        names = [n for n, _ in model.named_parameters()]
        assert twin.state_dict()["param_groups"][0]["param_names"] == names


def test_step_hooks_run_in_order_and_can_be_removed() -> None:
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    w = nn.Parameter(torch.randn(3, 2))
    opt = TVLARS([w], lr=0.1)
    sgd = torch.optim.SGD([nn.Parameter(torch.randn(2))], lr=0.1)
    calls: list[str] = []

    def hook(tag: str) -> Callable[..., None]:
        def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            calls.append(f"{tag}:{type(optimizer).__name__}")

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
        sgd.step()
        order = ["global_pre:TVLARS", "pre:TVLARS", "post:TVLARS", "global_post:TVLARS"]
        assert calls == [*order, "global_pre:SGD", "global_post:SGD"]
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    assert len(calls) == 6


def test_state_dict_hooks_run() -> None:
    w = nn.Parameter(torch.randn(3, 2))
    opt = TVLARS([w], lr=0.1)
    seen: list[str] = []

    def pre(optimizer: torch.optim.Optimizer) -> None:
        seen.append("pre")

    def post(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append("post")
        sd["extra"] = "from post hook"
        return sd

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert seen == ["pre", "post"] and sd["extra"] == "from post hook"
    del sd["extra"]

    def load_pre_a(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        state["param_groups"][0]["lr"] = 0.002

    def load_pre_b(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        state = copy.deepcopy(state)
        state["param_groups"][0]["lr"] = 0.003
        return state

    def load_post(optimizer: torch.optim.Optimizer) -> None:
        seen.append(f"load_post lr={optimizer.param_groups[0]['lr']}")

    opt.register_load_state_dict_pre_hook(load_pre_a)
    opt.register_load_state_dict_post_hook(load_post)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(load_pre_b, prepend=True)  # runs first, a overrides
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    assert seen[-2:] == ["load_post lr=0.002", "load_post lr=0.002"]


@PHASED
@FOREACH
def test_parameters_without_gradient_are_left_untouched(foreach: bool, phased: bool) -> None:
    live = nn.Parameter(torch.randn(4, 3))
    frozen = nn.Parameter(torch.randn(4, 3), requires_grad=False)
    never = nn.Parameter(torch.randn(3))  # requires grad, never gets one
    paused = nn.Parameter(torch.randn(4, 3))  # no gradient on steps 2 and 3
    opt = TVLARS(
        [{"params": [live, frozen, never]}, {"params": [paused], "weight_decay": 1e-2}],
        lr=0.5,
        trust_coefficient=0.05,
        phase=make_phase(phased),
        foreach=foreach,
    )
    untouched = {id(p): p.detach().clone() for p in (frozen, never)}
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        live.grad = torch.randn(4, 3, generator=gen)
        paused.grad = None if step in (2, 3) else torch.randn(4, 3, generator=gen)
        if step == 2:
            paused_before = paused.detach().clone()
            paused_buffer = opt.state[paused]["momentum_buffer"].clone()
        opt.step()
        if step == 3:
            assert torch.equal(paused.detach(), paused_before)
            assert torch.equal(opt.state[paused]["momentum_buffer"], paused_buffer)
    for p in (frozen, never):
        assert torch.equal(p.detach(), untouched[id(p)])
        assert p not in opt.state or "momentum_buffer" not in opt.state[p]
    assert not torch.equal(paused.detach(), paused_before)  # resumed afterwards


@PHASED
def test_foreach_matches_forloop_with_frozen_layers_and_odd_tensors(phased: bool) -> None:
    """torch's test_foreach_matches_forloop: 7 steps, a step with no gradients, a layer frozen for
    two steps, a 0-d parameter and a zero-size parameter last, in float64."""
    results = []
    for foreach in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid())
        model.double()
        scalar = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        empty = nn.Parameter(torch.empty(0, 3, dtype=torch.float64))
        opt = TVLARS(
            [*model.parameters(), scalar, empty],
            lr=0.5,
            trust_coefficient=0.05,
            weight_decay=1e-2,
            phase=make_phase(phased),
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
def test_empty_groups_and_groups_added_later(foreach: bool) -> None:
    w = nn.Parameter(torch.randn(4, 3))
    opt = TVLARS([{"params": [w]}, {"params": []}], lr=0.5, trust_coefficient=0.05, foreach=foreach)
    opt.add_param_group({"params": []})
    oracle = Oracle(opt, phased=False)
    for step in range(2):
        set_grads(params_of(opt), step)
        oracle.step()
        opt.step()
    b = nn.Parameter(torch.randn(3))
    v = nn.Parameter(torch.randn(2, 2))
    opt.add_param_group({"params": [b], "adapt": False, "lr": 0.1})
    opt.add_param_group({"params": [v], "weight_decay": 1e-2})
    assert [g["step"] for g in opt.param_groups] == [2] * 5
    for step in range(2, 5):
        set_grads(params_of(opt), step)
        oracle.step()
        opt.step()
    oracle.check(buffers=True)
    # the state dict of an optimizer with empty groups loads into an identical structure
    twin = TVLARS([{"params": [w]}, {"params": []}], lr=0.5, foreach=foreach)
    twin.add_param_group({"params": []})
    twin.add_param_group({"params": [b], "adapt": False})
    twin.add_param_group({"params": [v]})
    twin.load_state_dict(opt.state_dict())
    assert twin.step_count == 5 and twin.param_groups[3]["lr"] == 0.1


def test_zero_grad_sets_to_none_or_zeroes_in_place() -> None:
    model = small_net()
    opt = net_optimizer(model, foreach=None, phased=False)
    forward_backward(model, opt, 0)
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is g and torch.count_nonzero(g) == 0
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    forward_backward(model, opt, 1)
    opt.zero_grad()  # torch's default is set_to_none=True
    assert all(p.grad is None for p in model.parameters())


@FOREACH
def test_zero_gradients_without_decay_leave_parameters_unchanged(foreach: bool) -> None:
    w = nn.Parameter(torch.randn(5, 1))
    b = nn.Parameter(torch.randn(5))
    before = [w.detach().clone(), b.detach().clone()]
    opt = TVLARS([{"params": [w]}, {"params": [b], "adapt": False}], lr=0.1, foreach=foreach)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    assert_params_equal([w, b], before)


@PHASED
@FOREACH
def test_mixed_dtypes_each_match_the_reference(foreach: bool, phased: bool) -> None:
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    weights = [nn.Parameter(torch.randn(4, 3).to(d)) for d in dtypes]
    biases = [nn.Parameter(torch.randn(3).to(d)) for d in dtypes]
    opt = TVLARS(
        [
            {"params": weights, "weight_decay": 1e-2},
            {"params": biases, "adapt": False, "lr": 0.1},
        ],
        lr=1.0,
        trust_coefficient=0.05,
        phase=make_phase(phased),
        foreach=foreach,
    )
    oracle = Oracle(opt, phased)
    for step in range(4):
        set_grads(params_of(opt), step)
        oracle.step()
        opt.step()
    oracle.check()
    assert [p.dtype for p in params_of(opt)] == [*dtypes, *dtypes]
    assert all(opt.state[p]["momentum_buffer"].dtype == p.dtype for p in params_of(opt))


@FOREACH
def test_closure_runs_once_with_grad_enabled_and_its_loss_is_returned(foreach: bool) -> None:
    model = small_net()
    opt = net_optimizer(model, foreach, phased=True)
    calls: list[bool] = []
    losses: list[Tensor] = []

    def closure() -> Tensor:
        calls.append(torch.is_grad_enabled())
        loss = forward_backward(model, opt, len(calls))
        losses.append(loss)
        return loss

    with torch.no_grad():  # step() must enable grad for the closure itself
        result = opt.step(closure)
    assert calls == [True]
    assert result is losses[0]
    assert opt.step(closure) is losses[1] and calls == [True, True]


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non_contiguous"])
@FOREACH
def test_loss_goes_down(foreach: bool, contiguous: bool) -> None:
    """torch's test_forloop_goes_right_direction."""
    if contiguous:
        weight, bias = nn.Parameter(torch.randn(10, 5)), nn.Parameter(torch.randn(10))
    else:
        weight = nn.Parameter(torch.randn(10, 5, 2)[..., 0])
        bias = nn.Parameter(torch.randn(10, 2)[..., 0])
    x = torch.randn(5)
    opt = TVLARS(
        [{"params": [weight]}, {"params": [bias], "adapt": False, "lr": 0.01}],
        lr=0.5,
        trust_coefficient=0.02,
        foreach=foreach,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    assert closure().item() < initial


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


def _step_scheduler(sched: Any, i: int) -> None:
    if isinstance(sched, ReduceLROnPlateau):
        sched.step(1.0)  # never improves: the rate halves every step
    else:
        sched.step()


@pytest.mark.parametrize("name", list(SCHEDULERS))
@FOREACH
def test_lr_schedulers_drive_tvlars_as_they_drive_sgd(name: str, foreach: bool) -> None:
    torch.manual_seed(2)
    weight, bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    opt = TVLARS(
        [
            {"params": [weight], "lr": 0.2, "weight_decay": 1e-2},
            {"params": [bias], "lr": 0.1, "adapt": False},
        ],
        lr=0.2,
        momentum=0.9,
        trust_coefficient=0.05,
        phase=make_phase(True),
        foreach=foreach,
    )
    sgd = torch.optim.SGD(
        [
            {"params": [nn.Parameter(torch.randn(4, 3))], "lr": 0.2},
            {"params": [nn.Parameter(torch.randn(3))], "lr": 0.1},
        ],
        lr=0.2,
        momentum=0.9,
    )
    scheds = [SCHEDULERS[name](opt), SCHEDULERS[name](sgd)]
    oracle = Oracle(opt, phased=True)
    lrs = []
    for i in range(8):
        for o in (opt, sgd):
            set_grads(params_of(o), i)
        oracle.step()  # with the lr and momentum the scheduler set for this step
        opt.step()
        sgd.step()
        for sched in scheds:
            _step_scheduler(sched, i)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in sgd.param_groups]
        assert [g["momentum"] for g in opt.param_groups] == [
            g["momentum"] for g in sgd.param_groups
        ]
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, "the schedule never moved"
    oracle.check(buffers=True)
    if name == "OneCycleLR":  # cycle_momentum=True (the default) moved the momentum
        assert opt.param_groups[0]["momentum"] != 0.9


@FOREACH
def test_swa_utils_average_a_tvlars_run(foreach: bool) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    opt = TVLARS(
        lightning_tvlars.param_groups(model, weight_decay=1e-3),
        lr=0.5,
        trust_coefficient=0.05,
        foreach=foreach,
    )
    sgd = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]} for _ in opt.param_groups])
    for g, s in zip(opt.param_groups, sgd.param_groups, strict=True):
        s["lr"] = g["lr"]
    swa_model = AveragedModel(model)
    swa_sched, sgd_sched = (SWALR(o, swa_lr=0.05, anneal_epochs=2) for o in (opt, sgd))
    x = torch.randn(16, 4)
    snapshots = []
    for i in range(4):
        opt.zero_grad()
        model(x + i).square().mean().backward()
        opt.step()
        sgd.step()
        swa_model.update_parameters(model)
        swa_sched.step()
        sgd_sched.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in sgd.param_groups]
        snapshots.append([p.detach().clone() for p in model.parameters()])
    for k, p in enumerate(swa_model.module.parameters()):
        mean = torch.stack([s[k] for s in snapshots]).mean(0)
        torch.testing.assert_close(p.detach(), mean, **F32)
    update_bn([x], swa_model)
    features = swa_model.module[0](x).detach()
    torch.testing.assert_close(swa_model.module[1].running_mean, features.mean(0), **F32)


@PHASED
@FOREACH
def test_scheduler_and_optimizer_resume_identically(foreach: bool, phased: bool) -> None:
    def build(model: nn.Module) -> tuple[TVLARS, OneCycleLR]:
        opt = net_optimizer(model, foreach, phased)
        return opt, OneCycleLR(opt, max_lr=0.8, total_steps=8)

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
    ckpt = torch.load(buffer, weights_only=True)

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
    assert [g["momentum"] for g in opt.param_groups] == [g["momentum"] for g in opt2.param_groups]
    assert opt2.step_count == 8
