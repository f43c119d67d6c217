"""Sharpness of the loss at the current weights: Hessian spectrum and random-direction probes.

Three measures, all on a loss that a closure computes on a fixed batch:

- :func:`hessian_top_eigenvalue`: the dominant eigenvalue of the Hessian ``H`` of the loss with
  respect to the trainable parameters, by power iteration on Hessian-vector products.
- :func:`hessian_trace`: Hutchinson's estimate ``tr(H) ~ mean_i z_i^T H z_i`` with Rademacher
  probes ``z_i`` (exact for a diagonal ``H``).
- :func:`filter_normalized_sharpness`: the loss increase ``L(w + r d) - L(w)`` along random
  directions ``d`` whose every filter is rescaled to the norm of the matching filter of ``w``
  (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"). Unlike the other two it
  does not change when a ReLU network's layers are rescaled without changing its function.

:func:`measure_sharpness` runs any subset of the three with one shared gradient graph and returns
a :class:`SharpnessReport`. Every function leaves the model as it found it: ``p.grad`` of every
parameter is restored (``None`` stays ``None``), weights are restored bit for bit after a
perturbation, and a module passed as ``params`` or ``model`` is put in eval mode (Dropout is
off) with each submodule's training flag restored afterwards. BatchNorm layers normalize with
the statistics of the probe batch, as in training (``batch_norm="batch"``, the default), and
their running statistics are restored afterwards; ``batch_norm="running"`` uses the running
statistics instead, as at evaluation. Early in a large-batch run the running statistics lag
the weights so far that the eval-mode loss can be worse than chance: a Hessian taken there says
nothing about the landscape training moves on. Random draws come from a ``torch.Generator``
(``None`` means a fresh CPU generator seeded with 0), never from the global random state, so a
probe neither depends on nor changes the random stream of training. Only torch is imported.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_tvlars._validation import check_positive, check_positive_int

__all__ = [
    "MEASURES",
    "DirectionalSharpness",
    "SharpnessReport",
    "evaluation_mode",
    "filter_normalized_sharpness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "measure_sharpness",
    "preserved_grads",
]

#: The measures :func:`measure_sharpness` knows, in the order it computes them.
MEASURES: tuple[str, ...] = ("top_eigenvalue", "trace", "filter_normalized")

Normalization = Literal["filter", "layer", "none"]
#: Which statistics BatchNorm layers normalize with during a probe (see the module docstring).
BatchNormStatistics = Literal["batch", "running"]
_BATCH_NORM_STATISTICS: tuple[str, ...] = ("batch", "running")
_NORMALIZATIONS: tuple[str, ...] = ("filter", "layer", "none")

#: Largest accepted seed: ``seed * len(MEASURES) + k`` seeds the generator of measure ``k``.
_MAX_SEED = 2**32 - 1


# --------------------------------------------------------------------------------------------
# Results


class DirectionalSharpness(NamedTuple):
    """Loss increase along random directions, from :func:`filter_normalized_sharpness`.

    Attributes:
        mean: mean of ``L(w + s r d_i) - L(w)`` over the directions and both signs ``s = +-1``.
        max: the largest of those increases.
        loss: ``L(w)``, the loss at the unperturbed weights.
    """

    mean: float
    max: float
    loss: float


@dataclass(frozen=True)
class SharpnessReport:
    """One measurement of :func:`measure_sharpness` (one entry of ``SharpnessProbe.history``).

    A measure that was not requested is ``None``.

    Attributes:
        step: the optimizer step it was taken at (``trainer.global_step``), ``None`` outside a
            trainer.
        loss: the loss at the current weights on the probe batch (eval mode).
        top_eigenvalue: dominant Hessian eigenvalue (largest in magnitude).
        trace: Hutchinson estimate of the Hessian trace.
        trace_stderr: standard error of that estimate (``None`` with one probe vector).
        filter_normalized: mean loss increase along filter-normalized random directions.
        filter_normalized_max: largest loss increase over those directions.
        hessian_vector_products: Hessian-vector products computed (power iteration + trace).
        forward_passes: forward passes of the loss (one for the gradient graph, one for the
            unperturbed loss and two per direction for the random-direction probe).
        seconds: wall time of the measurement.
        num_samples: samples in the probe batch, when known.
    """

    step: int | None
    loss: float
    top_eigenvalue: float | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    filter_normalized: float | None = None
    filter_normalized_max: float | None = None
    hessian_vector_products: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    num_samples: int | None = None

    def metrics(self, prefix: str = "tvlars/sharpness") -> dict[str, float]:
        """The measured values as ``{f"{prefix}/<field>": value}``, for a logger.

        Keys: ``loss``, ``top_eigenvalue``, ``trace``, ``trace_stderr``, ``filter_normalized``
        and ``filter_normalized_max`` (those that were computed).
        """
        values = {
            "loss": self.loss,
            "top_eigenvalue": self.top_eigenvalue,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "filter_normalized": self.filter_normalized,
            "filter_normalized_max": self.filter_normalized_max,
        }
        return {f"{prefix}/{key}": value for key, value in values.items() if value is not None}


# --------------------------------------------------------------------------------------------
# Leaving the model as it was


@contextlib.contextmanager
def evaluation_mode(
    module: nn.Module, batch_norm: BatchNormStatistics = "batch"
) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own training flag on exit.

    Dropout is the identity: the loss is a deterministic function of the weights, which a
    Hessian needs. BatchNorm layers (``SyncBatchNorm`` too, on this rank's batch alone) normalize
    with the batch's statistics with ``batch_norm="batch"`` (their running statistics are put
    back as they were), with their running statistics with ``"running"``.
    """
    if batch_norm not in _BATCH_NORM_STATISTICS:
        raise ValueError(
            f"batch_norm={batch_norm!r} is invalid: expected one of "
            + ", ".join(repr(b) for b in _BATCH_NORM_STATISTICS)
        )
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    saved: list[tuple[nn.Module, list[Tensor]]] = []
    if batch_norm == "batch":
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                saved.append((m, [b.detach().clone() for b in m.buffers(recurse=False)]))
                if isinstance(m, nn.SyncBatchNorm):  # no collective: one rank probes alone
                    m.forward = types.MethodType(nn.modules.batchnorm._BatchNorm.forward, m)  # type: ignore[method-assign]
    try:
        yield module
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for live, kept in zip(m.buffers(recurse=False), buffers, strict=True):
                    live.copy_(kept)
                m.__dict__.pop("forward", None)
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def preserved_grads(params: Sequence[Tensor]) -> Iterator[None]:
    """Detach ``p.grad`` from every parameter for the block, then put the same objects back.

    Anything the block accumulates into ``.grad`` (e.g. a closure that calls ``backward``) goes
    to fresh tensors that are dropped; gradients that were ``None`` are ``None`` again. The
    objects are restored, not copies, so views into DDP gradient buckets stay valid.
    """
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad


def _trainable(params: nn.Module | Iterable[Tensor], name: str) -> list[Tensor]:
    found: list[Tensor]
    if isinstance(params, nn.Module):
        found = [p for p in params.parameters() if p.requires_grad]
    elif isinstance(params, Tensor):
        raise TypeError(
            f"{name}=<Tensor> is invalid: expected an nn.Module or an iterable of tensors; "
            "wrap a single tensor in a list"
        )
    else:
        found = list(params)
        for p in found:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{name} is invalid: expected an nn.Module or an iterable of tensors, found "
                    f"an item of type {type(p).__name__}"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"{name} is invalid: every tensor must have requires_grad=True, found one "
                    f"of shape {tuple(p.shape)} without"
                )
    if not found:
        raise ValueError(f"{name} is invalid: it holds no trainable parameter")
    return found


@contextlib.contextmanager
def _probing(
    params: nn.Module | Iterable[Tensor], name: str, batch_norm: BatchNormStatistics
) -> Iterator[list[Tensor]]:
    """Trainable parameters, with grads preserved and (for a module) :func:`evaluation_mode`."""
    tensors = _trainable(params, name)
    with contextlib.ExitStack() as stack:
        if isinstance(params, nn.Module):
            stack.enter_context(evaluation_mode(params, batch_norm))
        stack.enter_context(preserved_grads(tensors))
        yield tensors


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} is invalid: expected an int, got {type(seed).__name__}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed={seed!r} is invalid: expected an int in [0, 2**32 - 1]")
    return seed


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator={generator!r} is invalid: expected a torch.Generator or None, got "
            f"{type(generator).__name__}"
        )
    return generator


def _scalar_loss(loss_fn: Callable[[], Tensor]) -> Tensor:
    loss = loss_fn()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn returned {shape}: expected a scalar tensor")
    return loss.reshape(())


# --------------------------------------------------------------------------------------------
# Random vectors (drawn on the generator's device, then moved: the same numbers on any device)


def _gaussian(p: Tensor, generator: torch.Generator) -> Tensor:
    z = torch.randn(p.shape, generator=generator, device=generator.device, dtype=p.dtype)
    return z.to(p.device)


def _rademacher(p: Tensor, generator: torch.Generator) -> Tensor:
    bits = torch.randint(0, 2, p.shape, generator=generator, device=generator.device)
    return (bits.to(p.dtype) * 2 - 1).to(p.device)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum(dtype=torch.float64) for x, y in zip(a, b, strict=True)]).sum()


# --------------------------------------------------------------------------------------------
# Hessian-vector products


class _Hessian:
    """``v -> H v`` for the loss of ``loss_fn``: one forward and one backward with
    ``create_graph=True`` up front, then one double-backward per product."""

    def __init__(self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> None:
        self.params = params
        self.products = 0
        with torch.enable_grad():
            self.loss = _scalar_loss(loss_fn)
            if not self.loss.requires_grad:
                raise ValueError(
                    "loss_fn returned a loss that does not require grad: compute it from the "
                    "parameters, outside torch.no_grad() / torch.inference_mode()"
                )
            grads = torch.autograd.grad(
                self.loss, params, create_graph=True, allow_unused=True, materialize_grads=True
            )
        # A gradient that does not require grad is constant in w: its row of H is zero.
        self.grads = [(g, g.requires_grad) for g in grads]
        self.curved = any(flag for _, flag in self.grads)

    def __call__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        self.products += 1
        if not self.curved:
            return [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            dot = sum(
                ((g * v).sum() for (g, flag), v in zip(self.grads, vectors, strict=True) if flag),
                start=torch.zeros((), dtype=self.loss.dtype, device=self.loss.device),
            )
            products = torch.autograd.grad(
                dot, self.params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
        return [h.detach() for h in products]


def _power_iteration(
    hessian: _Hessian, iterations: int, tol: float, generator: torch.Generator
) -> float:
    vector = [_gaussian(p, generator) for p in hessian.params]
    norm = _dot(vector, vector).sqrt()
    vector = [v / norm.to(v.dtype) for v in vector]
    eigenvalue: float | None = None
    for _ in range(iterations):
        product = hessian(vector)
        rayleigh, norm = _dot(vector, product), _dot(product, product).sqrt()
        estimate, size = (float(x) for x in torch.stack([rayleigh, norm]).tolist())
        if size == 0.0 or not math.isfinite(size):
            return estimate  # H v = 0: v is in the null space (0), or the loss is not finite
        converged = eigenvalue is not None and abs(estimate - eigenvalue) <= tol * abs(estimate)
        eigenvalue = estimate
        if converged:
            break
        vector = [h / norm.to(h.dtype) for h in product]
    assert eigenvalue is not None
    return eigenvalue


def _hutchinson(
    hessian: _Hessian, samples: int, generator: torch.Generator
) -> tuple[float, float | None]:
    values = []
    for _ in range(samples):
        probe = [_rademacher(p, generator) for p in hessian.params]
        values.append(_dot(probe, hessian(probe)))
    stacked = torch.stack(values)
    mean = float(stacked.mean())
    stderr = float(stacked.std() / math.sqrt(samples)) if samples > 1 else None
    return mean, stderr


def hessian_top_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: nn.Module | Iterable[Tensor],
    iterations: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    *,
    batch_norm: BatchNormStatistics = "batch",
) -> float:
    """The dominant eigenvalue of the Hessian of ``loss_fn()`` w.r.t. ``params``.

    Power iteration ``v <- H v / ||H v||`` from a Gaussian start, with the Rayleigh quotient
    ``v^T H v`` as the estimate; it stops after ``iterations`` Hessian-vector products or once
    the estimate changes by at most ``tol`` (relative) between two products. It converges to
    the eigenvalue of largest *magnitude*: the top one near a minimum, where the positive side
    of the spectrum dominates, but a large negative one can win far from a minimum. The error
    after ``k`` products shrinks like ``(lambda_2 / lambda_1)^(2k)``.

    Cost: one forward and one backward with ``create_graph=True``, then one Hessian-vector
    product (a backward through the gradient graph, about twice a backward) per iteration.

    Args:
        loss_fn: computes the scalar loss on a fixed batch from the current parameters; it is
            called once.
        params: an ``nn.Module`` (its parameters with ``requires_grad``; the module is in eval
            mode during the call) or the tensors to differentiate with respect to.
        iterations: maximum Hessian-vector products.
        tol: relative change of the estimate below which the iteration stops.
        generator: draws the start vector; ``None`` is a CPU generator seeded with 0.

    Returns:
        The eigenvalue estimate (0 if ``H v = 0``).
    """
    check_positive_int("iterations", iterations)
    check_positive("tol", tol)
    gen = _generator(generator)
    with _probing(params, "params", batch_norm) as tensors:
        return _power_iteration(_Hessian(loss_fn, tensors), iterations, tol, gen)


def hessian_trace(
    loss_fn: Callable[[], Tensor],
    params: nn.Module | Iterable[Tensor],
    samples: int = 10,
    generator: torch.Generator | None = None,
    *,
    batch_norm: BatchNormStatistics = "batch",
) -> float:
    """Hutchinson's estimate of the trace of the Hessian of ``loss_fn()`` w.r.t. ``params``.

    ``tr(H) ~ (1 / n) sum_i z_i^T H z_i`` with Rademacher vectors ``z_i`` (entries +-1). The
    estimate is unbiased with variance ``2 sum_{j != k} H_jk^2 / n``: exact for a diagonal
    ``H``, noisy when off-diagonal curvature dominates.

    Cost: one forward and one backward with ``create_graph=True``, then ``samples``
    Hessian-vector products.

    Args:
        loss_fn: computes the scalar loss on a fixed batch; called once.
        params: an ``nn.Module`` (trainable parameters, eval mode during the call) or tensors.
        samples: number of probe vectors ``n``.
        generator: draws the probes; ``None`` is a CPU generator seeded with 0.

    Returns:
        The trace estimate.
    """
    check_positive_int("samples", samples)
    gen = _generator(generator)
    with _probing(params, "params", batch_norm) as tensors:
        return _hutchinson(_Hessian(loss_fn, tensors), samples, gen)[0]


# --------------------------------------------------------------------------------------------
# Random directions


def _direction(weights: Sequence[Tensor], norm: str, generator: torch.Generator) -> list[Tensor]:
    """A Gaussian direction, normalized like ``weights`` (Li et al. 2018, section 4)."""
    direction = []
    for w in weights:
        d = _gaussian(w, generator)
        if w.dim() <= 1 and norm != "none":
            d.zero_()  # biases and normalization parameters stay put, as in Li et al.
        elif norm == "filter":  # each slice along dim 0 (a conv filter, a neuron's row)
            reduce = tuple(range(1, w.dim()))
            w_norm = torch.linalg.vector_norm(w, dim=reduce, keepdim=True)
            d_norm = torch.linalg.vector_norm(d, dim=reduce, keepdim=True)
            d.mul_(w_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny))
        elif norm == "layer":
            w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
            d.mul_(w_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny))
        direction.append(d)
    return direction


def _directional(
    loss_fn: Callable[[], Tensor],
    weights: Sequence[Tensor],
    radius: float,
    directions: int,
    norm: str,
    generator: torch.Generator,
) -> DirectionalSharpness:
    originals = [w.detach().clone() for w in weights]
    increases = []
    with torch.no_grad():
        base = _scalar_loss(loss_fn)
        try:
            for _ in range(directions):
                direction = _direction(originals, norm, generator)
                for sign in (1.0, -1.0):
                    for w, d in zip(weights, direction, strict=True):
                        w.add_(d, alpha=sign * radius)
                    increases.append(_scalar_loss(loss_fn) - base)
                    for w, original in zip(weights, originals, strict=True):
                        w.copy_(original)  # bit for bit: no w + rd - rd rounding
        finally:
            for w, original in zip(weights, originals, strict=True):
                w.copy_(original)
    stacked = torch.stack(increases).double()
    mean, top, loss = torch.stack([stacked.mean(), stacked.max(), base.double()]).tolist()
    return DirectionalSharpness(mean=mean, max=top, loss=loss)


def filter_normalized_sharpness(
    loss_fn: Callable[[], Tensor],
    model: nn.Module,
    radius: float = 0.05,
    directions: int = 5,
    norm: Normalization = "filter",
    generator: torch.Generator | None = None,
    *,
    batch_norm: BatchNormStatistics = "batch",
) -> DirectionalSharpness:
    """Loss increase along random filter-normalized directions (Li et al. 2018).

    For each of ``directions`` Gaussian directions ``d`` (one tensor per trainable parameter):

    - ``norm="filter"``: each filter of a weight with ``ndim >= 2`` (each slice along dim 0:
      an output channel of a convolution, a row of a linear layer) is rescaled to the norm of
      the same filter of ``w``: ``d_f <- d_f / ||d_f|| * ||w_f||``; ``"layer"`` does the same
      per tensor; ``"none"`` keeps the raw Gaussian (not scale-invariant: for comparison).
    - with ``"filter"`` and ``"layer"``, parameters with ``ndim <= 1`` (biases, BatchNorm and
      LayerNorm affine parameters) get ``d = 0``, as in Li et al.'s code (``ignore="biasbn"``).

    The loss is evaluated at ``w + r d`` and ``w - r d`` (antithetic pairs cancel the
    first-order term ``r g.d`` on average, which matters away from a minimum). Because ``d``
    scales with the filters, the measure does not change when a filter of a ReLU network is
    multiplied by ``c > 0`` and its consumer by ``1 / c``, which changes every Hessian-based
    measure. Weights are restored bit for bit afterwards (copied back, not subtracted).

    Cost: ``1 + 2 * directions`` forward passes without gradients.

    Args:
        loss_fn: computes the scalar loss on a fixed batch from the current weights of
            ``model``; called ``1 + 2 * directions`` times.
        model: the module whose trainable parameters are perturbed (eval mode during the call).
        radius: step ``r`` along each direction, as a fraction of each filter's norm.
        directions: number of random directions (each probed with both signs).
        norm: ``"filter"`` (Li et al.), ``"layer"`` or ``"none"``.
        generator: draws the directions; ``None`` is a CPU generator seeded with 0.

    Returns:
        The mean and the largest increase ``L(w +- r d) - L(w)``, and ``L(w)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model=<{type(model).__name__}> is invalid: expected an nn.Module")
    check_positive("radius", radius)
    check_positive_int("directions", directions)
    if norm not in _NORMALIZATIONS:
        raise ValueError(
            f"norm={norm!r} is invalid: expected one of "
            + ", ".join(repr(n) for n in _NORMALIZATIONS)
        )
    gen = _generator(generator)
    with _probing(model, "model", batch_norm) as weights:
        return _directional(loss_fn, weights, radius, directions, norm, gen)


# --------------------------------------------------------------------------------------------
# All of them


def _check_measures(measures: object) -> tuple[str, ...]:
    """``measures`` must be a non-empty sequence of distinct names from :data:`MEASURES`."""
    if isinstance(measures, str) or not isinstance(measures, Sequence):
        raise TypeError(
            f"measures={measures!r} is invalid: expected a sequence of names from {MEASURES}"
        )
    if not measures or len(set(measures)) != len(measures) or set(measures) - set(MEASURES):
        raise ValueError(
            f"measures={measures!r} is invalid: expected distinct names from "
            + ", ".join(repr(m) for m in MEASURES)
        )
    return tuple(m for m in MEASURES if m in measures)


def measure_sharpness(
    loss_fn: Callable[[], Tensor],
    model: nn.Module,
    *,
    measures: Sequence[str] = MEASURES,
    iterations: int = 20,
    tol: float = 1e-3,
    trace_samples: int = 10,
    directions: int = 5,
    radius: float = 0.05,
    seed: int = 0,
    step: int | None = None,
    num_samples: int | None = None,
    batch_norm: BatchNormStatistics = "batch",
) -> SharpnessReport:
    """Measure the requested sharpness measures of ``loss_fn()`` at the weights of ``model``.

    The model is in :func:`evaluation_mode` for the whole call (BatchNorm on the batch's
    statistics by default), ``p.grad`` is preserved and weights are
    restored bit for bit (see the module docstring). The eigenvalue and the trace share one
    gradient graph. Measure ``k`` of :data:`MEASURES` draws from a CPU generator seeded with
    ``seed * 3 + k``: the same seed gives the same random vectors at every call, so probes at
    different steps or of different runs use common random numbers.

    Cost: ``1 + iterations + trace_samples`` forward/backward-equivalents for the Hessian
    (one forward and backward with ``create_graph=True``, then at most ``iterations`` products
    for the eigenvalue and exactly ``trace_samples`` for the trace, each about twice a
    backward), plus ``1 + 2 * directions`` forward passes without gradients.

    Args:
        loss_fn: the loss on a fixed batch, from the current weights of ``model``.
        model: the module whose trainable parameters are measured.
        measures: any of ``"top_eigenvalue"``, ``"trace"``, ``"filter_normalized"``.
        iterations: power-iteration products (see :func:`hessian_top_eigenvalue`).
        tol: relative tolerance of the power iteration.
        trace_samples: Rademacher probes of the trace (see :func:`hessian_trace`).
        directions: random directions (see :func:`filter_normalized_sharpness`).
        radius: step along the filter-normalized directions.
        seed: seeds the random vectors.
        step: recorded in the report.
        num_samples: recorded in the report (the size of the batch ``loss_fn`` uses).
        batch_norm: the statistics BatchNorm layers use: the batch's (``batch``, as in
            training) or their running ones (``running``); see :func:`evaluation_mode`.

    Returns:
        A :class:`SharpnessReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model=<{type(model).__name__}> is invalid: expected an nn.Module")
    wanted = _check_measures(measures)
    check_positive_int("iterations", iterations)
    check_positive("tol", tol)
    check_positive_int("trace_samples", trace_samples)
    check_positive_int("directions", directions)
    check_positive("radius", radius)
    _check_seed(seed)

    def generator(measure: str) -> torch.Generator:
        return torch.Generator().manual_seed(seed * len(MEASURES) + MEASURES.index(measure))

    start = time.perf_counter()
    eigenvalue = trace = trace_stderr = directional = directional_max = loss = None
    products = forwards = 0
    with _probing(model, "model", batch_norm) as params:
        if "top_eigenvalue" in wanted or "trace" in wanted:
            hessian = _Hessian(loss_fn, params)
            forwards += 1
            if "top_eigenvalue" in wanted:
                eigenvalue = _power_iteration(hessian, iterations, tol, generator("top_eigenvalue"))
            if "trace" in wanted:
                trace, trace_stderr = _hutchinson(hessian, trace_samples, generator("trace"))
            loss, products = float(hessian.loss.detach()), hessian.products
            del hessian  # frees the gradient graph before the forward passes below
        if "filter_normalized" in wanted:
            result = _directional(
                loss_fn, params, radius, directions, "filter", generator("filter_normalized")
            )
            forwards += 1 + 2 * directions
            directional, directional_max = result.mean, result.max
            loss = result.loss if loss is None else loss
    assert loss is not None
    return SharpnessReport(
        step=step,
        loss=loss,
        hessian_vector_products=products,
        forward_passes=forwards,
        seconds=time.perf_counter() - start,
        num_samples=num_samples,
        top_eigenvalue=eigenvalue,
        trace=trace,
        trace_stderr=trace_stderr,
        filter_normalized=directional,
        filter_normalized_max=directional_max,
    )
