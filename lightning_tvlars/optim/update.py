r"""The TVLARS update, in two implementations that compute the same thing.

A step has two phases: the trust ratio needs whole-tensor norms, and the skip decision (a
non-finite update anywhere skips the whole step) needs all of them before anything is written:

1. **norms**: :math:`\|w\|` and :math:`\|u\|`, :math:`u = g + \beta w`, of every local tensor;
2. **update**: :math:`b \leftarrow m b + s u,\ w \leftarrow w - \eta_{lr} b` with the per-tensor
   scale :math:`s = \phi(t)\, r` (adapted groups) or 1; a no-op on the device when skipped.

:class:`MultiTensorUpdate` (``foreach=None`` or ``True``) runs a fixed number of multi-tensor
operations per *batch* of tensors, every one on ATen's fast route (one device and dtype per
call, dense tensors, paired tensors of equal sizes and strides), so on CUDA the kernel count
does not grow with the number of tensors. ``u`` is formed in a workspace in which every tensor
starts on a ``BLOCK`` boundary: the per-tensor scale is then one broadcast multiply of the
workspace seen as ``(blocks, BLOCK)`` by a per-block factor, followed by torch's fused
momentum-SGD kernel. On accelerators the whole group is one batch and the workspace keeps ``u``
between the phases. On CPU, where memory traffic sets the pace, a batch holds at most
``CPU_BATCH`` elements (tensors larger than that are cut into 1-D pieces) and one batch-sized
workspace per group, device and dtype serves all its batches: phase 1 reads ``w`` and ``u`` for
the norms while they are in cache, phase 2 forms ``u`` again, walking the batches backwards (the
last ones phase 1 read are still in cache; the workspace still holds the last batch's ``u``),
and hands the scale to the fused kernel as the ``grad_scale`` it divides by, which saves a pass
over ``u``. Each tensor is read from memory about 7 times per step (``SGD(fused=True)``: 5).
Groups that are not adapted and not decayed need no workspace at all: the fused kernel reads
the gradients directly.

:class:`PlainUpdate` (``foreach=False``, and ``torch.compile``, whose Inductor fuses it) is the
reference: elementwise operations per tensor, any layout (gaps, transposes, gradients whose
strides differ from the parameter's), any device. :class:`~lightning_tvlars.TVLARS` also sends
it the tensors whose layout the fused kernels cannot take.

Neither reads a device value on the host.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from lightning_tvlars.optim.norms import accumulation_dtype

#: Elements per block of the workspace (every tensor or piece starts on a block boundary).
BLOCK = 512
#: Most elements in one batch on CPU: the batch's w, g, u and b (16 MB in float32) stay in L3.
CPU_BATCH = 1 << 20
#: Device types whose multi-tensor path runs batch by batch (see :class:`MultiTensorUpdate`);
#: the tests empty it to run the accelerators' path on CPU.
BATCHED_DEVICES = frozenset({"cpu"})


@dataclass
class GroupTensors:
    """The tensors of one parameter group that are updated this step (local pieces)."""

    group: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)  # as held: maybe DTensor / FSDP1 views
    names: list[str | None] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)  # what the kernels read and write
    grads: list[Tensor] = field(default_factory=list)
    buffers: list[Tensor] = field(default_factory=list)  # empty when momentum == 0

    def buffer(self, i: int) -> Tensor | None:
        return self.buffers[i] if self.buffers else None


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers a contiguous run of memory without gaps or overlaps."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def fused_layout(weight: Tensor, grad: Tensor, buffer: Tensor | None) -> bool:
    """Whether the multi-tensor path may take this tensor: the fused kernel indexes weight,
    gradient and buffer by memory position, so all must be dense with one layout, dtype and
    device."""
    stride = weight.stride()
    return (
        grad.dtype == weight.dtype
        and grad.device == weight.device
        and grad.stride() == stride
        and (
            buffer is None
            or (
                buffer.stride() == stride
                and buffer.dtype == weight.dtype
                and buffer.device == weight.device
            )
        )
        and (weight.is_contiguous() or is_dense(weight))
    )


def to_device(values: list[int], device: torch.device) -> Tensor:
    """An int64 tensor of ``values`` on ``device``, copied without a host sync on CUDA
    (from pinned memory, asynchronously)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def flat(t: Tensor) -> Tensor:
    """A dense tensor as the 1-D run of memory it occupies (its elements in memory order)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by device and dtype, in order (one multi-tensor call each)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        buckets[(t.device, t.dtype)].append(i)
    return buckets


class StepFlags:
    """The step's skip decision, copied once to each device that needs it (no host sync)."""

    def __init__(self, skipped: Tensor) -> None:
        self._skipped: dict[torch.device, Tensor] = {skipped.device: skipped}
        self._found_inf: dict[torch.device, Tensor] = {}

    def skipped(self, device: torch.device) -> Tensor:
        """A bool scalar on ``device``: True when the whole step is a no-op."""
        if device not in self._skipped:
            first = next(iter(self._skipped.values()))
            self._skipped[device] = first.to(device, non_blocking=True)
        return self._skipped[device]

    def found_inf(self, device: torch.device) -> Tensor:
        """The same decision in the float32 form that torch's fused kernels read."""
        if device not in self._found_inf:
            self._found_inf[device] = self.skipped(device).to(torch.float32)
        return self._found_inf[device]


class PlainUpdate:
    """Elementwise ops per tensor: any layout, any device, and the path Inductor fuses."""

    def __init__(self, tensors: GroupTensors, order: list[int] | None = None) -> None:
        """``order``: the group's tensors this path takes (all of them by default)."""
        self.tensors = tensors
        self.order = list(range(len(tensors.params))) if order is None else order
        self._updates: list[Tensor] = []

    def norms(self) -> tuple[Tensor, Tensor]:
        t, decay = self.tensors, self.tensors.group["weight_decay"]
        weights = [t.weights[i] for i in self.order]
        self._updates = [
            t.grads[i] if decay == 0 else t.grads[i].add(t.weights[i], alpha=decay)
            for i in self.order
        ]
        dtype = accumulation_dtype(weights)
        device = weights[0].device
        return (
            torch.stack([torch.linalg.vector_norm(w, dtype=dtype).to(device) for w in weights]),
            torch.stack(
                [torch.linalg.vector_norm(u, dtype=dtype).to(device) for u in self._updates]
            ),
        )

    def apply(self, scale: Tensor | None, flags: StepFlags) -> None:
        t, group = self.tensors, self.tensors.group
        momentum, lr = group["momentum"], group["lr"]
        for k, (i, u) in enumerate(zip(self.order, self._updates, strict=True)):
            w = t.weights[i]
            skipped = flags.skipped(w.device)
            if scale is not None:
                u = u * scale[k].to(w.device)
            buffer = t.buffer(i)
            if buffer is not None:
                buffer.copy_(torch.where(skipped, buffer, buffer * momentum + u))
                u = buffer
            w.copy_(torch.where(skipped, w, w - lr * u))
        self._updates = []


@dataclass
class Batch:
    """Tensors (or 1-D pieces of big ones) that go through the multi-tensor ops together.

    ``weights``, ``buffers`` and ``views`` (the workspace, laid out like the weights) are
    views made once; ``pieces`` says where each entry comes from: ``(tensor, piece)`` with
    ``piece`` None for a whole tensor.
    """

    pieces: list[tuple[int, int | None]]
    weights: list[Tensor]
    buffers: list[Tensor]
    views: list[Tensor]
    matrix: Tensor  # the batch's workspace as (blocks, BLOCK)
    owner: Tensor  # per block: the position (in the layout's order) of the tensor it holds
    whole: list[int] | None  # the group's tensor indices, when the batch has no pieces


@dataclass
class Layout:
    """How one group's tensors of one device and dtype are cut into batches (built once).

    Attributes:
        order: the group's tensor indices, in the order of the returned norms and scales.
        owner: per entry of all batches, the position of its tensor in ``order`` (only
            needed when big tensors are cut into pieces: their norms are then summed).
    """

    order: list[int]
    batches: list[Batch]
    owner: Tensor | None
    workspace: bool  # False: plain momentum SGD, the fused kernel reads the gradients
    batch_size: int | None  # at most this many elements per batch (CPU), or one batch
    norm_dtype: torch.dtype  # see accumulation_dtype

    @classmethod
    def build(
        cls, tensors: GroupTensors, order: list[int], workspace: bool, batch_size: int | None
    ) -> Layout:
        weights = [tensors.weights[i] for i in order]
        # Cut tensors bigger than a batch into 1-D pieces, then fill batches in order.
        entries: list[tuple[int, int | None, int]] = []  # (position, piece, numel)
        for k, w in enumerate(weights):
            n = w.numel()
            if batch_size is None or n <= batch_size:
                entries.append((k, None, n))
            else:
                entries += [
                    (k, j, min(batch_size, n - a)) for j, a in enumerate(range(0, n, batch_size))
                ]
        chunks: list[list[tuple[int, int | None, int]]] = [[]]
        filled = 0
        for entry in entries:
            blocks = max(1, math.ceil(entry[2] / BLOCK)) * BLOCK
            if chunks[-1] and batch_size is not None and filled + blocks > batch_size + BLOCK:
                chunks.append([])
                filled = 0
            chunks[-1].append(entry)
            filled += blocks
        size = max(sum(max(1, math.ceil(n / BLOCK)) for _, _, n in c) for c in chunks)
        device, dtype = weights[0].device, weights[0].dtype
        buffer = torch.zeros(size * BLOCK if workspace else 0, dtype=dtype, device=device)
        batches = []
        for chunk in chunks:
            views, owners, offset = [], [], 0
            ws, bs = [], []
            for position, piece, n in chunk:
                i = order[position]
                w, b = tensors.weights[i], tensors.buffer(i)
                if piece is None:
                    ws.append(w)
                    if b is not None:
                        bs.append(b)
                    shape, stride = tuple(w.shape), w.stride()
                else:
                    start = piece * batch_size  # type: ignore[operator]
                    ws.append(flat(w)[start : start + n])
                    if b is not None:
                        bs.append(flat(b)[start : start + n])
                    shape, stride = (n,), (1,)
                blocks = max(1, math.ceil(n / BLOCK))
                if workspace:
                    views.append(buffer.as_strided(shape, stride, offset))
                owners += [position] * blocks
                offset += blocks * BLOCK
            matrix = buffer[:offset].view(-1, BLOCK) if workspace else buffer
            owners_ = to_device(owners, device)
            cut = any(j is not None for _, j, _ in chunk)
            whole = None if cut else [order[p] for p, _, _ in chunk]
            batches.append(
                Batch([(p, j) for p, j, _ in chunk], ws, bs, views, matrix, owners_, whole)
            )
        pieces = any(j is not None for _, j, _ in entries)
        owner = to_device([p for p, _, _ in entries], device) if pieces else None
        return cls(order, batches, owner, workspace, batch_size, accumulation_dtype(weights))


def _fused_momentum_step(
    weights: list[Tensor],
    updates: list[Tensor],
    buffers: list[Tensor],
    group: dict[str, Any],
    found_inf: Tensor,
    grad_scale: Tensor | None = None,
) -> None:
    """``b = m b + u / grad_scale; w -= lr b`` in torch's fused SGD kernel (which writes
    ``u / grad_scale`` back into ``u``); a no-op if ``found_inf``."""
    torch._fused_sgd_(
        weights,
        updates,
        buffers,
        weight_decay=0.0,
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,  # buffers start at zero: m * 0 + u == u
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


class MultiTensorUpdate:
    """A fixed number of multi-tensor operations per batch (see the module docstring).

    ``u`` is formed in a block workspace. On accelerators it is formed once, with fast-route
    multi-tensor operations, kept between the phases, and the per-tensor scale is one broadcast
    multiply. On CPU, where multi-tensor operations are loops anyway, one batch-sized workspace
    serves every batch: ``u`` is formed with one ``torch.add(..., out=)`` per entry (two passes
    less than copy then add, and no fresh output, which on CPU costs page faults), again in
    phase 2 for every batch but the last (the workspace still holds its ``u``), and the fused
    kernel of each entry divides it by the reciprocal of its scale (float32 tensors; the kernel
    reads ``grad_scale`` as float32, so float64 ones multiply).
    """

    def __init__(self, tensors: GroupTensors, layout: Layout) -> None:
        self.tensors, self.layout, self.order = tensors, layout, layout.order
        self.workspace, self.cpu = layout.workspace, layout.batch_size is not None
        # On CPU with several batches, the layout's one workspace ends phase 1 holding the
        # last batch's u only: phase 2 forms the others' again.
        self.reform = self.cpu and self.workspace and len(layout.batches) > 1
        self.divide = self.cpu and layout.norm_dtype == torch.float32
        self._grads: list[list[Tensor]] = []

    def _batch_grads(self) -> list[list[Tensor]]:
        """This step's gradients (or their pieces), batch by batch."""
        t, order, size = self.tensors, self.order, self.layout.batch_size
        pieces: dict[int, tuple[Tensor, ...]] = {}
        out = []
        for batch in self.layout.batches:
            if batch.whole is not None:
                out.append([t.grads[i] for i in batch.whole])
                continue
            grads = []
            for position, piece in batch.pieces:
                g = t.grads[order[position]]
                if piece is None:
                    grads.append(g)
                else:
                    if position not in pieces:
                        pieces[position] = flat(g).split(size)
                    grads.append(pieces[position][piece])
            out.append(grads)
        return out

    def _form_updates(self, batch: Batch, grads: list[Tensor]) -> list[Tensor]:
        """``u = g + weight_decay * w`` in the workspace (or ``g`` itself without one)."""
        if not self.workspace:
            return grads
        decay = self.tensors.group["weight_decay"]
        if self.cpu:
            for view, g, w in zip(batch.views, grads, batch.weights, strict=True):
                if decay != 0:
                    torch.add(g, w, alpha=decay, out=view)
                else:
                    view.copy_(g)
            return batch.views
        torch._foreach_copy_(batch.views, grads)
        if decay != 0:
            torch._foreach_add_(batch.views, batch.weights, alpha=decay)
        return batch.views

    def norms(self) -> tuple[Tensor, Tensor]:
        self._grads = self._batch_grads()
        dtype = self.layout.norm_dtype
        weight_norms: list[Tensor] = []
        update_norms: list[Tensor] = []
        for batch, grads in zip(self.layout.batches, self._grads, strict=True):
            updates = self._form_updates(batch, grads)
            norms = torch._foreach_norm([*batch.weights, *updates], 2, dtype=dtype)
            weight_norms += norms[: len(updates)]
            update_norms += norms[len(updates) :]
        w, u = torch.stack(weight_norms), torch.stack(update_norms)
        owner = self.layout.owner
        if owner is not None:  # pieces of big tensors: sum their squares per tensor
            both = torch.stack([w, u], dim=1).square()
            total = both.new_zeros(len(self.order), 2).index_add_(0, owner, both).sqrt()
            w, u = total.unbind(1)
        return w, u

    def apply(self, scale: Tensor | None, flags: StepFlags) -> None:
        group = self.tensors.group
        device = self.layout.batches[0].owner.device
        found_inf = flags.found_inf(device)
        if scale is not None:
            scale = scale.to(device, non_blocking=True)
        inverse = scale.float().reciprocal().unbind() if scale is not None and self.divide else ()
        # Backwards: on CPU the batches that phase 1 read last are still in cache, and the
        # shared workspace still holds the last one's u.
        backwards = reversed(list(zip(self.layout.batches, self._grads, strict=True)))
        for k, (batch, grads) in enumerate(backwards):
            updates = (
                self._form_updates(batch, grads)
                if self.reform and k > 0
                else (batch.views if self.workspace else grads)
            )
            if inverse:
                buffers = [[b] for b in batch.buffers] or [[]] * len(updates)
                for (position, _), w, u, b in zip(
                    batch.pieces, batch.weights, updates, buffers, strict=True
                ):
                    _fused_momentum_step([w], [u], b, group, found_inf, inverse[position])
                continue
            if scale is not None:
                batch.matrix.mul_(scale.index_select(0, batch.owner).unsqueeze(1))
            _fused_momentum_step(batch.weights, updates, batch.buffers, group, found_inf)
        self._grads = []


def needs_workspace(group: dict[str, Any]) -> bool:
    """Scaled or decayed updates are formed in a workspace; plain momentum SGD (neither
    adapted nor decayed) hands the gradients to the fused kernel."""
    return bool(group["adapt"] or group["weight_decay"] != 0)


def storage(weights: Sequence[Tensor], buffers: Sequence[Tensor]) -> tuple[tuple[int, ...], ...]:
    """Where the weights and the momentum buffers are stored."""
    return tuple(map(Tensor.data_ptr, weights)), tuple(map(Tensor.data_ptr, buffers))


def structure_key(tensors: GroupTensors) -> tuple[Any, ...]:
    """What a group's :class:`GroupPlan` depends on, read in C-level maps each step.

    The views a plan holds are fixed by where and how the weights and momentum buffers are
    stored (replaced storage, a reshaped or re-typed weight, buffers loaded from a state dict);
    the split between the paths by the gradients' strides (a gradient's dtype is its weight's);
    the workspace and the device check by the group's options.
    """
    w, g, b, group = tensors.weights, tensors.grads, tensors.buffers, tensors.group
    return (
        storage(w, b),
        group["foreach"],
        needs_workspace(group),
        tuple(map(Tensor.size, w)),
        tuple(map(Tensor.stride, w)),
        tuple(map(_dtype, w)),
        tuple(map(Tensor.stride, g)),
    )


def _dtype(t: Tensor) -> torch.dtype:
    return t.dtype


@dataclass
class GroupPlan:
    """How one group's tensors are split between the implementations, with the layouts and
    workspaces of the multi-tensor part. Built when the group's :func:`structure_key` changes,
    so that a step does not check every tensor's layout again."""

    key: tuple[Any, ...]
    plain: list[int]  # tensors whose layout the fused kernels cannot take
    layouts: list[Layout]  # the others, one layout per device and dtype
    weights: list[Tensor]  # the tensors the layouts hold (or hold views of)
    buffers: list[Tensor]

    @classmethod
    def build(cls, key: tuple[Any, ...], tensors: GroupTensors) -> GroupPlan:
        """Split by layout (:func:`fused_layout`) and device (those with torch's fused
        kernels), then cut each device and dtype into batches."""
        group = tensors.group
        devices = _get_fused_kernels_supported_devices()
        others = {w.device.type for w in tensors.weights} - set(devices)
        if group["foreach"] and others:
            raise ValueError(
                f"foreach=True needs tensors on devices with torch's fused kernels "
                f"{sorted(devices)}, this group has tensors on {sorted(others)}; use foreach=None"
            )
        fused: list[int] = []
        plain: list[int] = []
        for i in range(len(tensors.weights)):
            w = tensors.weights[i]
            ok = w.device.type in devices and fused_layout(w, tensors.grads[i], tensors.buffer(i))
            (fused if ok else plain).append(i)
        workspace = needs_workspace(group)
        layouts = []
        for (device, _), bucket in by_device_and_dtype([tensors.weights[i] for i in fused]).items():
            batch_size = CPU_BATCH if device.type in BATCHED_DEVICES else None
            order = [fused[k] for k in bucket]
            layouts.append(Layout.build(tensors, order, workspace, batch_size))
        return cls(key, plain, layouts, list(tensors.weights), list(tensors.buffers))

    def fits(self, key: tuple[Any, ...]) -> bool:
        """Built for this key, and the tensors it holds are still stored where the key says
        (storage swapped out of a held tensor may be reused by another one, at the same
        address)."""
        return key == self.key and storage(self.weights, self.buffers) == key[0]

    def updates(self, tensors: GroupTensors) -> list[PlainUpdate | MultiTensorUpdate]:
        """This step's updates of the group's tensors."""
        updates: list[PlainUpdate | MultiTensorUpdate] = (
            [PlainUpdate(tensors, self.plain)] if self.plain else []
        )
        return updates + [MultiTensorUpdate(tensors, layout) for layout in self.layouts]


class GroupPlans:
    """The optimizer's cache of group plans and their workspaces (scratch memory, never saved)."""

    def __init__(self) -> None:
        self._plans: dict[int, GroupPlan] = {}

    def plans(self, groups: Sequence[GroupTensors]) -> list[GroupPlan]:
        """The plan of each group for this step's tensors, rebuilt where they changed. Plans
        of groups not given (removed, frozen, switched to ``foreach=False``) are dropped, with
        the tensors and workspaces they hold."""
        plans: dict[int, GroupPlan] = {}
        for tensors in groups:
            key = structure_key(tensors)
            plan = self._plans.get(id(tensors.group))
            if plan is None or not plan.fits(key):
                plan = GroupPlan.build(key, tensors)
            plans[id(tensors.group)] = plan
        self._plans = plans
        return list(plans.values())

    def layouts(self) -> list[Layout]:
        return [layout for plan in self._plans.values() for layout in plan.layouts]
