"""The optimizers under test, one row each (torch's ``OptimizerInfo``, optax's
``_OPTIMIZERS_UNDER_TEST``): how to build one for the generic tests, its independent float64
oracle, its per-parameter state and its invalid arguments.

The generic tests (``test_contract.py``) run every row; what only one optimizer has lives in
``test_tvlars.py`` / ``test_lamb.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from reference_impl import PlainLAMB, PlainTVLARS
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tvlars import LAMB, TVLARS, SigmoidPhase
from lightning_tvlars.optim.base import LayerwiseOptimizer

# The phase of these tests: phi moves a lot over a few steps (1/(1+e^-0.6) = 0.65 at t = 0,
# 0.5 at t = 2), so a copy or a resume that loses t or the phase shows in the weights.
PHASE_ARGS = {"decay": 0.3, "delay": 2.0}
PHASE_TUPLE = (1.0, 0.3, 2.0, 0.0)  # (alpha, decay, delay, floor) for the oracles

# Tolerances against the float64 oracles.
# float32: every step rounds the weights and the state to float32 (relative error ~6e-8 each)
# and takes float32 norms for the trust ratio (~1e-7); over the <= 8 steps of these tests the
# drift stays two orders of magnitude below rtol=1e-5. atol covers entries near zero.
F32 = {"rtol": 1e-5, "atol": 1e-6}
# float64: same algorithm, same precision as the oracle; only the summation order of the norms
# and of the fused kernels differ (a few ulps).
F64 = {"rtol": 1e-10, "atol": 1e-12}
# bfloat16: 8 significant bits; each step rounds w to bf16 (<= 2^-9 relative), the oracle keeps
# float64 weights, so after 4 steps the gap is <= 4 * 2^-9 = 0.8% of |w| plus the rounding of
# the bf16 state; rtol=1.6e-2 (torch's default for bf16) leaves a factor of 2, atol=1e-2 covers
# entries near zero whose ulp is set by the update, not by the weight.
BF16 = {"rtol": 1.6e-2, "atol": 1e-2}
TOL = {torch.float32: F32, torch.float64: F64, torch.bfloat16: BF16, torch.float16: BF16}

# Host reads a step must not make (each one is a device synchronisation on an accelerator).
HOST_READS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__index__")


def make_phase(phased: bool) -> SigmoidPhase | None:
    return SigmoidPhase(**PHASE_ARGS) if phased else None


@dataclass(frozen=True)
class Info:
    """One optimizer under test.

    Attributes:
        cls: the class.
        options: constructor options of the generic tests (large enough steps that an error
            shows: a small trust coefficient would hide it).
        adapted: group options of an adapted group with weight decay (on top of ``options``).
        excluded: group options of a group neither adapted nor decayed.
        state_keys: per-parameter state once a parameter stepped.
        oracle: builds the float64 reference from the optimizer's groups (see :class:`Oracle`).
        bad: constructor arguments each refused with ``ValueError`` naming the value.
    """

    cls: type[LayerwiseOptimizer]
    options: dict[str, Any]
    adapted: dict[str, Any]
    excluded: dict[str, Any]
    state_keys: tuple[str, ...]
    oracle: Callable[[LayerwiseOptimizer, bool], Any]
    bad: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cls.__name__

    def build(
        self,
        params: Any,
        *,
        phased: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> Any:
        return self.cls(
            params, phase=make_phase(phased), foreach=foreach, **{**self.options, **options}
        )

    def two_groups(self, params: list[Tensor]) -> list[dict[str, Any]]:
        """First half adapted with weight decay, second half excluded (neither)."""
        half = max(1, len(params) // 2)
        groups = [{"params": params[:half], **self.adapted}]
        if params[half:]:
            groups.append({"params": params[half:], **self.excluded})
        return groups


def _tvlars_group(group: dict[str, Any]) -> dict[str, Any]:
    return {
        "lr": float(group["lr"]),
        "momentum": float(group["momentum"]),
        "weight_decay": float(group["weight_decay"]),
        "eta": float(group["trust_coefficient"]),
        "clip": group["norm_clip"],
        "adapt": group["adapt"],
        "nesterov": group["nesterov"],
        "maximize": group["maximize"],
    }


def _lamb_group(group: dict[str, Any]) -> dict[str, Any]:
    adapt = group["adapt"]
    if adapt is None:
        adapt = group["weight_decay"] != 0 or group["always_adapt"]
    return {
        "lr": float(group["lr"]),
        "beta1": group["betas"][0],
        "beta2": group["betas"][1],
        "eps": group["eps"],
        "weight_decay": float(group["weight_decay"]),
        "adapt": adapt,
        "bias_correction": group["bias_correction"],
        "grad_averaging": group["grad_averaging"],
        "trust_clip": group["trust_clip"],
        "decoupled": group["decoupled_decay"],
        "maximize": group["maximize"],
    }


class Oracle:
    """A float64 reference shadowing an optimizer.

    Before each step it copies the groups' current options (LR schedulers change them) and
    picks up groups added with ``add_param_group``.
    """

    def __init__(self, opt: LayerwiseOptimizer, phased: bool) -> None:
        self.opt = opt
        self.shadow: dict[int, Tensor] = {}
        self.convert = _tvlars_group if isinstance(opt, TVLARS) else _lamb_group
        groups = [self._group(g) for g in opt.param_groups]
        phase = PHASE_TUPLE if phased else None
        if isinstance(opt, TVLARS):
            self.ref: Any = PlainTVLARS(groups, phase)
        else:
            self.ref = PlainLAMB(groups, phase, opt.defaults["max_grad_norm"])

    def _group(self, group: dict[str, Any]) -> dict[str, Any]:
        params = []
        for p in group["params"]:
            self.shadow[id(p)] = p.detach().to(torch.float64, copy=True).contiguous()
            params.append(self.shadow[id(p)])
        return {"params": params, **self.convert(group)}

    def step(self) -> None:
        groups = self.opt.param_groups
        for ref_group, group in zip(self.ref.groups, groups, strict=False):
            ref_group.update(self.convert(group))
        for group in groups[len(self.ref.groups) :]:
            self.ref.groups.append(self._group(group))
        grads = {
            id(self.shadow[id(p)]): p.grad.double()
            for p in params_of(self.opt)
            if p.grad is not None
        }
        self.ref.step(grads)

    def check(self, tol: dict[str, float] | None = None) -> None:
        for i, p in enumerate(params_of(self.opt)):
            expected = self.shadow[id(p)]
            torch.testing.assert_close(
                p.detach().double(),
                expected,
                **(tol or TOL[p.dtype]),
                msg=lambda m, i=i: f"param {i}: {m}",
            )


TVLARS_INFO = Info(
    cls=TVLARS,
    options={"lr": 0.5, "trust_coefficient": 0.05},
    adapted={"weight_decay": 1e-2},
    excluded={"adapt": False, "weight_decay": 0.0, "lr": 0.1, "momentum": 0.8},
    state_keys=("momentum_buffer",),
    oracle=Oracle,
    bad=[
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
        ({"nesterov": True, "momentum": 0.0}, "nesterov=True"),
    ],
)

LAMB_INFO = Info(
    cls=LAMB,
    options={"lr": 0.05, "max_grad_norm": 2.0},
    adapted={"weight_decay": 1e-2},
    excluded={"adapt": False, "weight_decay": 0.0, "lr": 0.02},
    state_keys=("step", "exp_avg", "exp_avg_sq"),
    oracle=Oracle,
    bad=[
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": float("inf")}, "lr=inf"),
        ({"betas": (1.0, 0.999)}, "betas[0]=1.0"),
        ({"betas": (0.9, -0.1)}, "betas[1]=-0.1"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm=0.0"),
        ({"foreach": 1}, "foreach=1"),
    ],
)

OPTIMIZERS = [TVLARS_INFO, LAMB_INFO]
EACH = pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda info: info.name)
FOREACH = pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "forloop"])
PHASED = pytest.mark.parametrize("phased", [True, False], ids=["phase", "nophase"])


# ----------------------------------------------------------------------------- helpers


def params_of(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def set_grads(params: list[Tensor], step: int, seed: int = 0) -> list[Tensor]:
    """Give every parameter a deterministic gradient (contiguous) for ``step``; returns them."""
    gen = torch.Generator().manual_seed(10_000 * seed + step)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return grads


def small_net() -> nn.Module:
    """Weights, biases and a LayerNorm: an adapted and an excluded group."""
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))


def net_optimizer(
    info: Info, model: nn.Module, foreach: bool | None = None, phased: bool = False, **kw: Any
) -> Any:
    import lightning_tvlars

    groups = lightning_tvlars.param_groups(model, weight_decay=1e-2)
    return info.build(groups, phased=phased, foreach=foreach, **kw)


def batch(i: int, n: int = 8, d: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(500 + i)
    return torch.randn(n, d, generator=gen), torch.randn(n, 3, generator=gen)


def forward_backward(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> Tensor:
    x, y = batch(i)
    dtype = next(model.parameters()).dtype
    x, y = x.to(dtype), y.to(dtype)
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - y).square().mean()
    loss.backward()
    return loss


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


def assert_state_equal(opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer) -> None:
    for i, (p, q) in enumerate(zip(params_of(opt_a), params_of(opt_b), strict=True)):
        assert_same(opt_a.state.get(p, {}), opt_b.state.get(q, {}), f"state[{i}]")


class HostReadSpy:
    """Makes every host read of a tensor raise while armed; ``reads`` names those attempted
    (also caught if the code swallowed the error)."""

    def __init__(self) -> None:
        self.originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
        self.reads: list[str] = []

    def _forbidden(self, name: str) -> Callable[..., Any]:
        def read(*args: Any, **kwargs: Any) -> Any:
            self.reads.append(name)
            raise AssertionError(f"Tensor.{name} inside the optimizer step: a host read")

        return read

    def arm(self, *_: Any) -> None:
        for name in HOST_READS:
            setattr(torch.Tensor, name, self._forbidden(name))

    def disarm(self, *_: Any) -> None:
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    @contextlib.contextmanager
    def armed(self) -> Iterator[list[str]]:
        """Armed for a block (a whole ``step()`` call with every hook, a scheduler's step)."""
        self.arm()
        try:
            yield self.reads
        finally:
            self.disarm()


class ScalarReadCounter(TorchDispatchMode):
    """Names every ``aten._local_scalar_dense`` dispatched while :attr:`armed`: the host reads
    that torch's own kernels make (a foreach operator given a 0-d tensor operand on CPU calls
    ``.item()`` in C++), which no Python method of ``Tensor`` sees."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads
        self.armed = False

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if self.armed and func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append("aten._local_scalar_dense")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads_inside_step(opt: torch.optim.Optimizer) -> Iterator[list[str]]:
    """Make every host read of a tensor raise while ``opt.step`` runs (hooks arm and disarm),
    and record those that torch's kernels make inside it (:class:`ScalarReadCounter`).

    Yields the names of the reads attempted (also caught if the step swallowed the error).
    """
    spy = HostReadSpy()
    counter = ScalarReadCounter(spy.reads)

    def arm(*_: Any) -> None:
        counter.armed = True
        spy.arm()

    def disarm(*_: Any) -> None:
        spy.disarm()
        counter.armed = False

    handles = [opt.register_step_pre_hook(arm), opt.register_step_post_hook(disarm)]
    try:
        with counter:
            yield spy.reads
    finally:
        disarm()
        for handle in handles:
            handle.remove()
