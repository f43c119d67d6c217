"""Layer-wise L2 norms of weights and updates, exact under DDP, FSDP2, tensor parallel and FSDP1.

The optimizer works on the *local* tensors of each parameter (for a DTensor its shard, for an
FSDP1 parameter its flat view into this rank's shard). A norm of a local piece is not the norm
of the parameter, so local squared norms are summed across the ranks that hold the other pieces:

* plain tensors (single device, DDP): the local tensor is the whole parameter, nothing to do;
* DTensor (FSDP2, HSDP, tensor parallel, FSDP2 + tensor parallel), and the local parameters that
  ``DistributedDataParallel(device_mesh=...)`` makes of tensor-parallel DTensors (TP + DDP):
  sum over the *reduction mesh*, the largest mesh of the parameters, which must contain the
  others (a parameter may live on a sub-mesh, such as the data-parallel mesh of a module that
  the tensor-parallel plan does not cover). Each element is counted once: a rank contributes
  only if its coordinate is 0 on every ``Replicate`` dimension of the parameter's mesh and its
  copy of that mesh is the one that holds the lowest rank of the reduction mesh;
* FSDP1 ``use_orig_params=True``: sum over the shard process group of the parameter's
  ``FlatParamHandle`` (the intra-node group under ``HYBRID_SHARD``, none under ``NO_SHARD``).

All squared norms are packed into one float vector and reduced with one ``all_reduce`` per
distinct process group (one in total for FSDP2, tensor parallel and FSDP1 ``FULL_SHARD``, none
for DDP). Norms accumulate in float32 (float64 for float64 tensors). No collective depends on a
rank-local condition: the parameter lists are identical on all ranks.

Gradients whose DTensor placements differ from their parameter's (``Partial(sum)`` gradients of
``Replicate()`` parameters under ``SequenceParallel``) are brought to the parameter's placements
by :func:`local_gradients`, with one ``all_reduce`` per process group for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # torch.distributed may be unavailable on some builds
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


_DTENSOR_TYPES: tuple[type, ...] = () if DTensor is None else (DTensor,)


def is_dtensor(x: object) -> bool:
    return isinstance(x, _DTENSOR_TYPES)


def local_tensor(x: Tensor) -> Tensor:
    """The part of ``x`` stored on this rank (``x`` itself unless it is a DTensor)."""
    return x.to_local() if isinstance(x, _DTENSOR_TYPES) else x  # type: ignore[attr-defined]


def local_gradients(params: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """The local tensor of each gradient, laid out exactly like ``local_tensor(param)``.

    Plain tensors pass through untouched. A DTensor gradient with its parameter's placements
    gives its local tensor. One whose placements differ is redistributed to the parameter's:
    ``Partial`` sums and averages (the gradients of ``Replicate()`` parameters under
    ``SequenceParallel``) are copied into one flat buffer per set of mesh-dimension process
    groups and dtype and summed with one ``all_reduce`` per group; whatever then still differs
    (``Replicate`` to ``Shard``: a local slice), and rare cases (``Shard`` gradients of
    ``Replicate`` parameters, other reduce ops), go through ``DTensor.redistribute``. The
    gradients themselves are not modified.

    Which collectives run depends only on the placements, so every rank must pass the same
    parameter list (the optimizer does).
    """
    if len(params) != len(grads):
        raise ValueError(
            f"params and grads must have the same length, got {len(params)} and {len(grads)}"
        )
    out = list(grads)
    if DTensor is None:  # pragma: no cover
        return out
    packs: dict[tuple[object, ...], _Pack] = {}
    fallback: list[int] = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if not isinstance(g, DTensor):
            continue
        if not isinstance(p, DTensor):
            raise TypeError(
                f"gradient {i} is a DTensor but its parameter is a {type(p).__name__}: "
                "expected a DTensor parameter (or plain tensors for both)"
            )
        mesh = p.device_mesh
        if g.placements == p.placements and (g.device_mesh is mesh or g.device_mesh == mesh):
            out[i] = g.to_local()
            continue
        if g.device_mesh != mesh:
            raise ValueError(
                f"gradient {i} lives on {g.device_mesh}, its parameter on {mesh}: "
                "expected the same device mesh"
            )
        if not _add_to_pack(packs, i, p, g):
            fallback.append(i)
    for pack in packs.values():
        flat = torch.cat([t.reshape(-1) for t in pack.tensors])
        for group in pack.groups:
            dist.all_reduce(flat, group=group)
        for entry, piece in zip(pack.entries, flat.split(pack.numels), strict=True):
            out[entry.index] = _finish(entry, piece.view(entry.shape), params[entry.index])
    for i in fallback:
        p, g = params[i], grads[i]
        out[i] = g.redistribute(p.device_mesh, p.placements).to_local()  # type: ignore[attr-defined]
    return out


@dataclass
class _PackEntry:
    """One gradient in a :class:`_Pack`: where it goes and what is left to do after the sum."""

    index: int
    shape: torch.Size
    divisor: int  # product of the mesh sizes of the Partial("avg") dimensions
    intermediate: tuple[Any, ...]  # the gradient's placements with Partial made Replicate
    global_shape: torch.Size
    global_stride: tuple[int, ...]


@dataclass
class _Pack:
    """Local gradients summed together over the same process groups (one buffer)."""

    groups: tuple[dist.ProcessGroup, ...]
    tensors: list[Tensor] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    entries: list[_PackEntry] = field(default_factory=list)


def _add_to_pack(packs: dict[tuple[object, ...], _Pack], i: int, p: Tensor, g: Tensor) -> bool:
    """Queue the ``Partial`` sums of gradient ``g``; False if DTensor must redistribute it."""
    mesh = g.device_mesh  # type: ignore[attr-defined]
    dims: list[int] = []
    divisor = 1
    intermediate = list(g.placements)  # type: ignore[attr-defined]
    for d, (gp, pp) in enumerate(zip(g.placements, p.placements, strict=True)):  # type: ignore[attr-defined]
        if not isinstance(gp, Partial) or isinstance(pp, Partial):
            continue
        if type(gp) is not Partial or gp.reduce_op not in ("sum", "avg"):
            return False
        dims.append(d)
        intermediate[d] = Replicate()
        if gp.reduce_op == "avg":
            divisor *= mesh.size(d)
    if not dims:
        return False
    local = g.to_local()  # type: ignore[attr-defined]
    groups = tuple(mesh.get_group(d) for d in dims)
    key = (tuple(id(group) for group in groups), local.dtype, local.device)
    pack = packs.setdefault(key, _Pack(groups))
    pack.tensors.append(local)
    pack.numels.append(local.numel())
    pack.entries.append(
        _PackEntry(i, local.shape, divisor, tuple(intermediate), g.shape, tuple(g.stride()))
    )
    return True


def _finish(entry: _PackEntry, summed: Tensor, p: Tensor) -> Tensor:
    """The summed local gradient brought the rest of the way to ``p``'s placements."""
    if entry.divisor != 1:
        summed = summed.div_(entry.divisor)
    if entry.intermediate != tuple(p.placements):  # type: ignore[attr-defined]
        mesh = p.device_mesh  # type: ignore[attr-defined]
        summed = DTensor.from_local(
            summed,
            mesh,
            entry.intermediate,
            run_check=False,
            shape=entry.global_shape,
            stride=entry.global_stride,
        )
        summed = summed.redistribute(mesh, p.placements).to_local()  # type: ignore[attr-defined]
    expected = local_tensor(p).shape
    if summed.shape != expected:  # pragma: no cover - DTensor guarantees it
        raise ValueError(
            f"gradient {entry.index} has local shape {tuple(summed.shape)} after redistribution, "
            f"its parameter {tuple(expected)}"
        )
    return summed


#: FSDP1 sharding of a parameter: the shard process group, or ``None`` when not sharded.
ShardGroups = Mapping[int, "dist.ProcessGroup | None"]


@dataclass(frozen=True)
class ReductionPlan:
    """How the local squared norms of a fixed parameter list become full-tensor norms.

    Attributes:
        groups: ``(process_group, indices)``: entries summed over that group, one collective each.
        counts: per parameter, 1.0 if this rank's piece counts, 0.0 if it is a replica.
    """

    groups: tuple[tuple[dist.ProcessGroup | None, tuple[int, ...]], ...]
    counts: tuple[float, ...]
    _device_tensors: dict[tuple[object, ...], Tensor] = field(
        default_factory=dict, compare=False, repr=False
    )

    def _cached(self, key: tuple[object, ...], make: Callable[[], Tensor]) -> Tensor:
        """Device copies of the plan's constants, made once (no per-step host-to-device copy)."""
        if key not in self._device_tensors:
            self._device_tensors[key] = make()
        return self._device_tensors[key]

    @property
    def needs_reduction(self) -> bool:
        return bool(self.groups)

    @staticmethod
    def build(params: Sequence[Tensor], fsdp1_groups: ShardGroups | None = None) -> ReductionPlan:
        """Inspect the parameters (DTensor placements, registered FSDP1 groups)."""
        fsdp1_groups = fsdp1_groups or {}
        specs = [_mesh_and_placements(p) for p in params]
        meshes = _MeshInfo.of([spec[0] for spec in specs if spec is not None])
        # Per parameter: the group to sum over (_WORLD for meshes spanning the world), or None.
        targets: list[object] = []
        counts: list[float] = []
        for p, spec in zip(params, specs, strict=True):
            if spec is not None:
                mesh, placements = spec
                targets.append(meshes.target)
                counts.append(_dtensor_count(mesh, placements, meshes))
            elif id(p) in fsdp1_groups and fsdp1_groups[id(p)] is not None:
                targets.append(fsdp1_groups[id(p)])
                counts.append(1.0)
            else:
                if getattr(p, "_fsdp_flattened", False) and id(p) not in fsdp1_groups:
                    raise ValueError(
                        "this optimizer holds FSDP1 parameters (flattened shard views) whose "
                        "process groups are unknown: call optimizer.attach_fsdp(fsdp_model) after "
                        "wrapping (configure_tvlars does this under Lightning's FSDPStrategy)"
                    )
                targets.append(None)
                counts.append(1.0)
        distinct = {id(t): t for t in targets if t is not None}
        if not distinct:
            return ReductionPlan((), tuple(counts))
        if len(distinct) == 1:
            # Full (replicated) tensors join the one reduction, counted once (group rank 0).
            (only,) = distinct.values()
            group = _as_group(only)
            first = dist.get_rank(group) == 0 if group is not None else dist.get_rank() == 0
            counts = [
                c if t is not None else float(first) for c, t in zip(counts, targets, strict=True)
            ]
            return ReductionPlan(((group, tuple(range(len(params)))),), tuple(counts))
        groups = tuple(
            (_as_group(t), tuple(i for i, x in enumerate(targets) if x is t))
            for t in distinct.values()
        )
        return ReductionPlan(groups, tuple(counts))

    def reduce(self, local: Tensor) -> Tensor:
        """Full-tensor norms from local norms (``local`` may stack several lists per parameter)."""
        if not self.needs_reduction:
            return local
        n = len(self.counts)
        repeats = local.numel() // n
        counts = self._cached(
            ("counts", local.device, local.dtype, repeats),
            lambda: torch.tensor(self.counts, dtype=local.dtype, device=local.device).repeat(
                repeats
            ),
        )
        squares = local.square() * counts
        if len(self.groups) == 1 and len(self.groups[0][1]) == n:
            dist.all_reduce(squares, group=self.groups[0][0])
        else:
            for g, (group, index) in enumerate(self.groups):
                rows = self._cached(
                    ("rows", g, local.device, repeats),
                    lambda index=index: torch.tensor(  # type: ignore[misc]
                        [i + k * n for k in range(repeats) for i in index], device=local.device
                    ),
                )
                part = squares.index_select(0, rows)
                dist.all_reduce(part, group=group)
                squares.index_copy_(0, rows, part)
        return squares.sqrt()


_WORLD = object()  # marks DTensor parameters on meshes that span the world: default group


def _as_group(target: object) -> dist.ProcessGroup | None:
    """The process group of a reduction target (None is the default group for all_reduce)."""
    return None if target is _WORLD else cast("dist.ProcessGroup", target)


def _mesh_and_placements(p: Tensor) -> tuple[Any, tuple[Any, ...]] | None:
    """The device mesh and placements of a sharded parameter, ``None`` for a full tensor.

    A DTensor's own; or, for the local parameters that ``DistributedDataParallel(device_mesh=...)``
    makes of tensor-parallel DTensors (TP + DDP), the DTensor spec it keeps in ``_st_info``.
    """
    if is_dtensor(p):
        return p.device_mesh, tuple(p.placements)  # type: ignore[attr-defined]
    spec = getattr(p, "_st_info", None)
    if spec is not None and hasattr(spec, "mesh") and hasattr(spec, "placements"):
        return spec.mesh, tuple(spec.placements)
    return None


@dataclass
class _MeshInfo:
    """The device meshes of the sharded parameters and the one their norms are summed over.

    The reduction mesh is the largest; every other mesh (a sub-mesh) must lie inside it, so
    that its copies partition it and the copy holding the reduction mesh's lowest rank can
    stand for all. That assumes the copies hold the same values, as they do when every copy
    runs the same module on the same inputs (a module outside the TP plan sees the same
    activations on all tensor-parallel ranks); it is not checked, which would cost a collective.
    """

    target: object  # _WORLD, or the process group of a 1-D reduction mesh
    lowest: int  # the lowest global rank of the reduction mesh
    size: int  # the number of ranks of the reduction mesh
    ranks: dict[int, frozenset[int]]  # id(mesh) -> the ranks of this rank's copy of the mesh

    @staticmethod
    def of(meshes: Sequence[Any]) -> _MeshInfo:
        distinct = {id(m): m for m in meshes}
        for m in distinct.values():
            if m.get_coordinate() is None:
                raise ValueError(
                    f"rank {dist.get_rank()} is not in {m}, the device mesh of one of its "
                    "parameters: expected every parameter on a mesh that contains this rank"
                )
        ranks = {key: frozenset(m.mesh.flatten().tolist()) for key, m in distinct.items()}
        if not distinct:
            return _MeshInfo(None, 0, 0, ranks)
        span = max(ranks.values(), key=len)
        outside = [m for key, m in distinct.items() if not ranks[key] <= span]
        if outside:
            widest = next(m for key, m in distinct.items() if ranks[key] == span)
            raise ValueError(
                f"the parameters' device meshes do not nest: {outside[0]} is not inside "
                f"{widest}. TVLARS sums all norms over one mesh that contains the meshes of all "
                "parameters; shard or replicate every parameter on that mesh or one of its "
                "sub-meshes (e.g. apply fully_shard or the TP plan on slices of one root mesh)"
            )
        if len(span) == dist.get_world_size():
            return _MeshInfo(_WORLD, min(span), len(span), ranks)
        widest_1d = [m for key, m in distinct.items() if ranks[key] == span and m.ndim == 1]
        if not widest_1d:
            widest = next(m for key, m in distinct.items() if ranks[key] == span)
            raise ValueError(
                f"parameters on {widest}, a {widest.ndim}-D mesh of {len(span)} of the "
                f"{dist.get_world_size()} ranks, are not supported: TVLARS sums norms with one "
                "all_reduce over a mesh that spans all ranks or has one dimension (this happens "
                "with pipeline parallelism over a multi-dimensional mesh)"
            )
        return _MeshInfo(widest_1d[0].get_group(), min(span), len(span), ranks)


def _dtensor_count(mesh: Any, placements: Sequence[Any], meshes: _MeshInfo) -> float:
    """1.0 if this rank's piece of a parameter on ``mesh`` is counted in the norm, else 0.0.

    Counted: coordinate 0 on every ``Replicate`` mesh dimension, on the copy of ``mesh`` (a
    sub-mesh of the reduction mesh) that holds the reduction mesh's lowest rank.
    """
    coordinate = mesh.get_coordinate()  # not None: checked by _MeshInfo.of
    ranks = meshes.ranks[id(mesh)]
    if meshes.size % len(ranks) != 0:
        raise ValueError(
            f"{mesh} ({len(ranks)} ranks) cannot tile the reduction mesh of {meshes.size} ranks: "
            "expected sub-meshes sliced from one root mesh"
        )
    count = 1.0 if meshes.lowest in ranks else 0.0
    for dim, placement in enumerate(placements):
        if isinstance(placement, Partial):
            raise ValueError(
                f"DTensor placement {placement} is not supported for parameters: expected "
                "Shard or Replicate"
            )
        if isinstance(placement, Replicate) and coordinate[dim] != 0:
            count = 0.0
    return count


def fsdp1_shard_groups(model: nn.Module) -> dict[int, dist.ProcessGroup | None]:
    """Map every original parameter of an FSDP1 model to its shard group (``None``: unsharded).

    Needs ``use_orig_params=True`` (Lightning's default); with ``use_orig_params=False`` the
    optimizer holds ``FlatParameter`` objects that mix several layers, and TVLARS refuses them.
    """
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    groups: dict[int, dist.ProcessGroup | None] = {}
    for handle in _get_fsdp_handles(model):
        flat = handle.flat_param
        params = flat._params if flat._params is not None else []
        shared = flat._shared_params if flat._shared_params is not None else []
        group = handle.process_group if handle.uses_sharded_strategy else None
        for p in [*params, *shared]:
            groups[id(p)] = group
    return groups


def is_flat_parameter(p: Tensor) -> bool:
    """True for FSDP1 ``FlatParameter`` (``use_orig_params=False``)."""
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:  # pragma: no cover
        return False
    return isinstance(p, FlatParameter)
