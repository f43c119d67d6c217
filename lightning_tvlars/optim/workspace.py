r"""How the multi-tensor paths lay a group's tensors out: buckets, batches, a block workspace.

A group's tensors are split into *buckets* that each take one path: the elementwise path (any
layout, any device), or one multi-tensor :class:`Layout` per device and dtype, for tensors whose
weight, gradient and state share one dense layout (torch's fused kernels index them by memory
position). A layout cuts its tensors into batches and gives every batch a *workspace* in which
each tensor starts on a ``BLOCK`` boundary: a per-tensor factor is then one broadcast multiply
of the workspace seen as ``(blocks, BLOCK)`` by a per-block vector, and every multi-tensor call
is on ATen's fast route (one device and dtype per call, dense tensors, paired tensors of equal
sizes and strides), so on CUDA the kernel count does not grow with the number of tensors.

On accelerators a layout is one batch. On CPU, where memory traffic sets the pace, a batch holds
at most ``CPU_BATCH`` elements (bigger tensors are cut into 1-D pieces) and one batch-sized
workspace serves every batch, so that a batch is still in cache when it is read again
(measured on one CPU thread, 13-23% faster than one group-sized batch).

Layouts are built once per *structure* (where the weights and the state are stored, shapes,
strides, dtypes, the gradients' strides, the options that decide the path) and cached by
:class:`LayoutCache`; a change of structure between steps rebuilds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import _get_fused_kernels_supported_devices

#: Elements per block of the workspace (every tensor or piece starts on a block boundary).
BLOCK = 512
#: Most elements in one batch on CPU: a batch's weights, gradients, state and workspace stay in
#: the last-level cache.
CPU_BATCH = 1 << 20
#: Device types whose layouts are cut into cache-sized batches and handled tensor by tensor
#: (see :attr:`Layout.per_tensor`); the tests empty it to run the accelerators' path on CPU.
BATCHED_DEVICES = frozenset({"cpu"})
#: Dtypes the multi-tensor paths take; 16-bit tensors are computed in float32 elementwise.
MULTI_TENSOR_DTYPES = (torch.float32, torch.float64)


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


def fused_layout(weight: Tensor, grad: Tensor, state: Sequence[Tensor]) -> bool:
    """Whether the multi-tensor path may take a tensor: the fused kernels index the weight, the
    gradient and the state by memory position, so all must be dense with one layout, dtype and
    device (and a dtype the path computes in)."""
    stride = weight.stride()
    return (
        weight.dtype in MULTI_TENSOR_DTYPES
        and weight.device.type in _get_fused_kernels_supported_devices()
        and all(
            t.stride() == stride and t.dtype == weight.dtype and t.device == weight.device
            for t in (grad, *state)
        )
        and (weight.is_contiguous() or is_dense(weight))
    )


def flat(t: Tensor) -> Tensor:
    """A dense tensor as the 1-D run of memory it occupies (its elements in memory order)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (never on CPU-only builds)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def to_device(values: list[int], device: torch.device) -> Tensor:
    """An int64 tensor of ``values`` on ``device``, copied without a host sync on CUDA
    (from pinned memory, asynchronously)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Batch(NamedTuple):
    """Tensors (or 1-D pieces of big ones) that go through the multi-tensor calls together.

    Every list has one entry per tensor or piece; the views are made once.
    """

    positions: list[int]  # the layout position of each entry's tensor
    pieces: list[slice | None]  # the flat elements of a big tensor an entry holds; None: all
    weights: list[Tensor]
    state: list[list[Tensor]]  # per state list of the layout, its entries
    views: list[list[Tensor]]  # per workspace, its views laid out like the entries
    matrices: list[Tensor]  # per workspace, the batch's part as (blocks, BLOCK)
    owner: Tensor  # per block: the layout position of the tensor it holds

    def cut(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """This batch's entries of per-tensor values laid out like the weights (gradients),
        given in the layout's order."""
        return [
            tensors[i] if piece is None else flat(tensors[i])[piece]
            for i, piece in zip(self.positions, self.pieces, strict=True)
        ]


@dataclass
class Layout:
    """One bucket's tensors (one device and dtype) cut into batches over a block workspace.

    Attributes:
        members: the group positions of the tensors, in the order of norms and scales.
        batches: the batches, in order.
        owner: per entry of all batches, the layout position of its tensor, when big tensors
            are cut into pieces (their norms are then summed); None otherwise.
        per_tensor: calls go tensor by tensor (CPU, where multi-tensor calls are loops
            anyway and an elementwise call can write its result in place); otherwise every
            call is a multi-tensor call over the batch.
    """

    members: list[int]
    batches: list[Batch]
    owner: Tensor | None
    per_tensor: bool

    @classmethod
    def build(
        cls,
        index: list[int],
        weights: Sequence[Tensor],
        state: Sequence[Sequence[Tensor]],
        *,
        workspaces: int,
        batch_size: int | None,
    ) -> Layout:
        """Lay out ``weights[i]`` for ``i`` in ``index`` and their ``state`` lists (each laid
        out like the weights) in batches of at most ``batch_size`` elements (None: one batch),
        with ``workspaces`` block workspaces."""
        chosen = [weights[i] for i in index]
        device, dtype = chosen[0].device, chosen[0].dtype
        size = batch_size
        # Cut tensors bigger than a batch into 1-D pieces, then fill batches in order.
        entries: list[tuple[int, slice | None]] = []
        for k, w in enumerate(chosen):
            n = w.numel()
            if size is None or n <= size:
                entries.append((k, None))
            else:
                entries += [(k, slice(a, min(a + size, n))) for a in range(0, n, size)]
        chunks: list[list[tuple[int, slice | None]]] = [[]]
        filled = 0
        for k, piece in entries:
            blocks = _blocks(chosen[k], piece) * BLOCK
            if chunks[-1] and size is not None and filled + blocks > size + BLOCK:
                chunks.append([])
                filled = 0
            chunks[-1].append((k, piece))
            filled += blocks
        most = max(sum(_blocks(chosen[k], p) for k, p in chunk) for chunk in chunks)
        buffers = [torch.zeros(most * BLOCK, dtype=dtype, device=device) for _ in range(workspaces)]
        batches = []
        for chunk in chunks:
            views: list[list[Tensor]] = [[] for _ in buffers]
            owners, offset = [], 0
            for k, piece in chunk:
                w = chosen[k] if piece is None else flat(chosen[k])[piece]
                for view, buffer in zip(views, buffers, strict=True):
                    view.append(buffer.as_strided(w.shape, w.stride(), offset))
                blocks = _blocks(chosen[k], piece)
                owners += [k] * blocks
                offset += blocks * BLOCK
            batch = Batch(
                [k for k, _ in chunk],
                [p for _, p in chunk],
                [],
                [],
                views,
                [buffer[:offset].view(-1, BLOCK) for buffer in buffers],
                to_device(owners, device),
            )
            batches.append(
                batch._replace(
                    weights=batch.cut(chosen),
                    state=[batch.cut([s[i] for i in index]) for s in state],
                )
            )
        cut = any(p is not None for _, p in entries)
        owner = to_device([k for k, _ in entries], device) if cut else None
        return cls(list(index), batches, owner, device.type in BATCHED_DEVICES)

    def tensor_norms(self, entry_norms: Tensor) -> Tensor:
        """Per-tensor norms from the norms of all entries (pieces summed in squares)."""
        if self.owner is None:
            return entry_norms
        total = entry_norms.new_zeros(len(self.members))
        return total.index_add_(0, self.owner, entry_norms.square()).sqrt()


def _blocks(t: Tensor, piece: slice | None) -> int:
    n = t.numel() if piece is None else piece.stop - piece.start
    return max(1, math.ceil(n / BLOCK))


class Bucket(NamedTuple):
    """Tensors of one group that take one path: elementwise (``layout`` None) or one layout."""

    members: list[int]  # their group positions
    layout: Layout | None


def split(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Sequence[Sequence[Tensor]],
    *,
    foreach: bool | None,
    workspaces: int,
    accelerator_batch: int | None = None,
) -> list[Bucket]:
    """A group's buckets: the multi-tensor layouts (one per device and dtype) for every tensor
    whose layout the fused kernels take (``foreach`` None or True), the elementwise path for
    the others; ``foreach=False``: all elementwise. ``foreach=True`` raises for tensors on a
    device without torch's fused kernels. Layouts are cut into batches of ``CPU_BATCH``
    elements on CPU, of ``accelerator_batch`` (None: one batch) elsewhere, with
    ``workspaces`` block workspaces."""
    if foreach is False:
        return [Bucket(list(range(len(weights))), None)]
    if foreach:
        devices = _get_fused_kernels_supported_devices()
        others = {w.device.type for w in weights} - set(devices)
        if others:
            raise ValueError(
                f"foreach=True needs tensors on devices with torch's fused kernels "
                f"{sorted(devices)}, this group has tensors on {sorted(others)}; use foreach=None"
            )
    fused: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    plain: list[int] = []
    for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
        if fused_layout(w, g, [s[i] for s in state]):
            fused.setdefault((w.device, w.dtype), []).append(i)
        else:
            plain.append(i)
    buckets = [Bucket(plain, None)] if plain else []
    for (device, _), index in fused.items():
        size = CPU_BATCH if device.type in BATCHED_DEVICES else accelerator_batch
        layout = Layout.build(index, weights, state, workspaces=workspaces, batch_size=size)
        buckets.append(Bucket(index, layout))
    return buckets


def structure(
    weights: Sequence[Tensor], grads: Sequence[Tensor], state: Sequence[Sequence[Tensor]]
) -> tuple[Any, ...]:
    """What a group's buckets depend on, read in C-level maps each step: where and how the
    weights and the state are stored (replaced storage, a reshaped or re-typed weight, state
    loaded from a state dict), and the gradients' strides (a gradient's dtype is its weight's)."""
    stored = [*weights, *(t for s in state for t in s)]
    return (
        tuple(map(Tensor.data_ptr, stored)),
        tuple(map(Tensor.size, weights)),
        tuple(map(Tensor.stride, stored)),
        tuple(t.dtype for t in stored),
        tuple(map(Tensor.stride, grads)),
    )


@dataclass
class _Entry:
    key: tuple[Any, ...]
    buckets: list[Bucket]
    held: list[Tensor]  # the tensors the layouts hold views of

    def fits(self, key: tuple[Any, ...]) -> bool:
        """Built for this key, and the tensors it holds are still stored where the key says
        (storage swapped out of a held tensor may be reused by another, at the same address)."""
        return key == self.key and tuple(map(Tensor.data_ptr, self.held)) == key[0]


class LayoutCache:
    """Each group's buckets and workspaces between steps (scratch memory, never saved)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], _Entry] = {}
        self._seen: dict[tuple[int, ...], _Entry] = {}

    def buckets(
        self,
        params: Sequence[Tensor],
        weights: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: Sequence[Sequence[Tensor]],
        *,
        foreach: bool | None,
        workspaces: int,
        accelerator_batch: int | None = None,
    ) -> list[Bucket]:
        """The buckets of a group's ``params`` (as held) for this step's local tensors (see
        :func:`split`), rebuilt where the structure or the options changed. Under
        ``torch.compile`` every tensor takes the elementwise path, which Inductor fuses."""
        if torch.compiler.is_compiling():
            return [Bucket(list(range(len(params))), None)]
        ids = tuple(map(id, params))
        key = (*structure(weights, grads, state), foreach, workspaces, accelerator_batch)
        entry = self._entries.get(ids)
        if entry is None or not entry.fits(key):
            if capturing():
                raise ValueError(
                    "a step that lays its tensors out is invalid inside a CUDA graph capture "
                    "(it copies index tensors from the host): take a few eager steps first, as "
                    "torch asks before a capture, and capture with the parameters, gradients "
                    "and state stored where they were in those steps"
                )
            buckets = split(
                weights,
                grads,
                state,
                foreach=foreach,
                workspaces=workspaces,
                accelerator_batch=accelerator_batch,
            )
            entry = _Entry(key, buckets, [*weights, *(t for s in state for t in s)])
        self._seen[ids] = entry
        return entry.buckets

    def end_step(self) -> None:
        """Keep only the groups of this step: the layouts of groups that left (removed, frozen)
        are dropped with the tensors and workspaces they hold."""
        self._entries, self._seen = self._seen, {}

    def layouts(self) -> list[Layout]:
        """The layouts in use (for tests and the benchmark)."""
        return [b.layout for e in self._entries.values() for b in e.buckets if b.layout]
