"""Worker functions for the tensor-parallel tests (importable by spawned processes).

Each worker parallelizes a small float64 transformer-style block with torch's own
``parallelize_module`` (plus ``fully_shard`` or ``DistributedDataParallel`` where named), feeds
each rank its share of a global batch, and trains it with TVLARS next to a single-process
reference that sees the whole batch. It compares the weights and the norms TVLARS reports, checks
that replicated weights are bit-identical on all ranks and counts the collectives of every
``optimizer.step()`` with ``CommDebugMode`` (which sees both ``torch.distributed`` calls and
the functional collectives DTensor issues). Failures are raised inside the worker; ``mp.spawn``
re-raises them in the test. Rank 0 writes the measurements to a JSON file.

``TOLERANCE``: in float64 each sum taken in another order than one process takes it (partial
gradients summed by ``all_reduce``, squared norms summed over ranks, matmuls split over the
tensor-parallel ranks) moves a result by ~1e-16 relative; the ~1e3 operations in a forward,
backward and step, over ``STEPS`` steps, stay below ~1e-13. ``rtol=1e-9`` leaves four orders of
magnitude of margin and is still seven below the error of a real bug (partial gradients or
local-shard norms: 1e-2 and more), which the negative controls check.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from dist_workers import chosen_optimizer, finish, init, make_optimizer, use_optimizer
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lightning_tvlars import TVLARS
from lightning_tvlars.optim import base as base_module
from lightning_tvlars.optim import norms as norms_module
from lightning_tvlars.optim.norms import ReductionPlan, local_gradients, local_tensor

STEPS = 3
BATCH, SEQ, FEATURES, HIDDEN = 4, 4, 6, 8
TOLERANCE = {"rtol": 1e-9, "atol": 1e-12}


class Block(nn.Module):
    """LayerNorm, up/down MLP, LayerNorm, projection, and a head left outside the TP plan."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(FEATURES)
        self.up = nn.Linear(FEATURES, HIDDEN)
        self.down = nn.Linear(HIDDEN, FEATURES)
        self.norm2 = nn.LayerNorm(FEATURES)
        self.proj = nn.Linear(FEATURES, FEATURES)
        self.head = nn.Linear(FEATURES, 1)
        with torch.no_grad():  # LayerNorm affine parameters away from 1 and 0
            for norm in (self.norm, self.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = self.down(torch.tanh(self.up(self.norm(x))))
        return self.head(torch.tanh(self.proj(self.norm2(h))))


def tp_plan() -> dict[str, ParallelStyle]:
    """Sequence parallel LayerNorms around a colwise/rowwise MLP; ``head`` is not in the plan.

    ``proj`` gathers its output, so ``head`` sees the same full activations on every
    tensor-parallel rank and stays a plain replicated module.
    """
    return {
        "norm": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1)),
        "norm2": SequenceParallel(),
        "proj": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, SEQ, FEATURES, generator=gen, dtype=torch.float64)
    return x, torch.randn(BATCH, SEQ, 1, generator=gen, dtype=torch.float64)


def local_batch(step: int, dp: tuple[int, int], tp: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """This rank's share: its data-parallel slice of the batch, its sequence chunk of the input.

    ``dp`` and ``tp`` are (coordinate, size). The target is the full sequence: ``proj``
    gathers the sequence again.
    """
    x, y = batch(step)
    b, s = BATCH // dp[1], SEQ // tp[1]
    rows = slice(dp[0] * b, (dp[0] + 1) * b)
    return x[rows, tp[0] * s : (tp[0] + 1) * s], y[rows]


def full_weights(opt: TVLARS) -> dict[str, Tensor]:
    """Every parameter as a full tensor (a collective for sharded ones, same order on all ranks).

    Read from the optimizer: after its first forward, a model that DDP wraps with a device mesh
    no longer lists its tensor-parallel parameters in ``named_parameters()``.
    """
    out = {}
    for group in opt.param_groups:
        for name, p in zip(group["param_names"], group["params"], strict=True):
            out[name] = _full(p)
    return out


def _full(p: Tensor) -> Tensor:
    """A parameter as a full tensor."""
    spec = getattr(p, "_st_info", None)  # TP + DDP: a local tensor and its DTensor spec
    if spec is not None:
        p = DTensor.from_local(
            p.detach(),
            spec.mesh,
            spec.placements,
            run_check=False,
            shape=spec.shape,
            stride=spec.stride,
        )
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def replicas_equal(full: dict[str, Tensor]) -> bool:
    """Whether every rank holds bit-identical full weights (replicas did not drift apart)."""
    same = True
    for tensor in full.values():
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        same &= all(torch.equal(t, gathered[0]) for t in gathered)
    return same


def max_relative_difference(full: dict[str, Tensor], reference: nn.Module) -> float:
    """max over parameters of max|w - w_ref| / max|w_ref|."""
    return max(
        float((full[name] - ref).abs().max() / ref.abs().max())
        for name, ref in ((n, r.detach()) for n, r in reference.named_parameters())
    )


def _norms(opt: TVLARS) -> dict[str, tuple[float, float]]:
    stats = opt.last_step_stats
    assert stats is not None and None not in stats.names
    pairs = zip(stats.weight_norm.tolist(), stats.update_norm.tolist(), strict=True)
    return dict(zip(stats.names, pairs, strict=True))  # type: ignore[arg-type]


def train(
    model: nn.Module,
    opt: TVLARS,
    share: Callable[[int], tuple[Tensor, Tensor]],
) -> dict[str, Any]:
    """STEPS steps of the parallel model and of a single-process reference on the global batch.

    Returns the measurements: max relative weight difference, max relative difference of the
    reported norms, whether replicas are equal, and the collectives of every ``step()``.
    """
    reference = Block()
    ref_opt = make_optimizer(reference)
    collectives: list[dict[str, int]] = []
    norm_error = 0.0
    for step in range(STEPS):
        x, y = share(step)
        nn.functional.mse_loss(model(x), y).backward()
        with CommDebugMode() as comm:
            opt.step()
        collectives.append({str(op): n for op, n in comm.get_comm_counts().items() if n})
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ours, theirs = _norms(opt), _norms(ref_opt)
        assert ours.keys() == theirs.keys(), (sorted(ours), sorted(theirs))
        for name, (w, u) in theirs.items():
            norm_error = max(norm_error, abs(ours[name][0] - w) / w, abs(ours[name][1] - u) / u)
    full = full_weights(opt)
    with torch.no_grad():
        pairs = zip(reference.parameters(), Block().parameters(), strict=True)
        moved = sum(float((a - b).abs().sum()) for a, b in pairs)
    assert moved > 0.05, "the models did not train"
    return {
        "weight_difference": max_relative_difference(full, reference),
        "norm_difference": norm_error,
        "replicas_equal": replicas_equal(full),
        "collectives": collectives,
    }


def assert_exact(result: dict[str, Any]) -> None:
    assert result["replicas_equal"], "replicated weights differ between ranks"
    assert result["weight_difference"] <= TOLERANCE["rtol"], result
    assert result["norm_difference"] <= TOLERANCE["rtol"], result


def assert_caught(result: dict[str, Any], what: str) -> None:
    """Negative control: the comparison must fail on a real error."""
    try:
        assert_exact(result)
    except AssertionError:
        return
    raise AssertionError(f"{what} passed the comparison: it cannot fail")


@contextmanager
def partial_gradients_taken_as_local() -> Iterator[None]:
    """The bug of issue #16: a gradient's local tensor used whatever its placements."""

    def naive(params: object, grads: list[Tensor]) -> list[Tensor]:
        return [local_tensor(g) for g in grads]

    with mock.patch.object(base_module, "local_gradients", naive):
        yield


@contextmanager
def every_copy_counted() -> Iterator[None]:
    """Each copy of a sub-mesh counted in the norms, not only one (replicas counted twice)."""
    of = norms_module._MeshInfo.of

    def every(meshes: list[DeviceMesh]) -> norms_module._MeshInfo:
        info = of(meshes)
        info.lowest = dist.get_rank()  # every rank's copy holds "the lowest rank"
        return info

    with mock.patch.object(norms_module._MeshInfo, "of", every):
        yield


@contextmanager
def local_shard_norms() -> Iterator[None]:
    """Norms of local pieces, not reduced: what TVLARS did for TP + DDP parameters."""
    with mock.patch.object(ReductionPlan, "reduce", lambda self, local: local):
        yield


def _write(out: str, result: dict[str, Any]) -> None:
    """Rank 0 writes the measurements."""
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------- 2 ranks: pure TP


def _check_local_gradients(mesh: DeviceMesh) -> dict[str, Any]:
    """Redistribution paths of ``local_gradients`` against ``DTensor.redistribute``."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(7)
    full = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    pieces = [t * (rank + 1) for t in full]  # a different partial value on every rank
    params = [
        distribute_tensor(full[0], mesh, [Replicate()]),
        distribute_tensor(full[1], mesh, [Replicate()]),
        distribute_tensor(full[2], mesh, [Shard(0)]),
        distribute_tensor(full[3], mesh, [Replicate()]),
        full[0],  # a plain tensor passes through untouched
    ]
    grads: list[Tensor] = [
        DTensor.from_local(pieces[0], mesh, [Partial("sum")]),
        DTensor.from_local(pieces[1], mesh, [Partial("avg")]),
        DTensor.from_local(pieces[2], mesh, [Partial("sum")]),  # to Shard(0): sum, then slice
        distribute_tensor(full[3], mesh, [Shard(1)]),  # Shard to Replicate: DTensor's all-gather
        pieces[0],
    ]
    with CommDebugMode() as comm:
        got = local_gradients(params, grads)
    for i, (p, g) in enumerate(zip(params[:4], grads[:4], strict=True)):
        want = g.redistribute(p.device_mesh, p.placements).to_local()
        assert got[i].shape == p.to_local().shape
        torch.testing.assert_close(got[i], want, **TOLERANCE, msg=f"gradient {i}")
    assert got[4] is grads[4]
    plain = [torch.ones(2), torch.zeros(3)]
    with CommDebugMode() as quiet:
        passed = local_gradients(plain, plain)
    assert all(a is b for a, b in zip(passed, plain, strict=True))
    assert quiet.get_total_counts() == 0
    return {str(op): n for op, n in comm.get_comm_counts().items() if n}


def sequence_parallel_worker(rank: int, world: int, port: int, out: str, optimizer: str) -> None:
    use_optimizer(optimizer)
    init(rank, world, port)
    _write(out, _sequence_parallel(rank, world))
    finish(dtensor=True)  # the models of the run above are released


def _sequence_parallel(rank: int, world: int) -> dict[str, Any]:
    """Pure tensor parallelism on 2 ranks with SequenceParallel LayerNorms.

    Then the negative control: partial gradients taken as local tensors (the bug of #16).
    """
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))

    def build() -> tuple[nn.Module, TVLARS]:
        model = parallelize_module(Block(), mesh, tp_plan())
        return model, make_optimizer(model)

    model, opt = build()
    result = train(model, opt, lambda step: local_batch(step, (0, 1), (rank, world)))
    result["placements"] = {
        n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()
    }
    grad_placements = {}
    x, y = local_batch(0, (0, 1), (rank, world))
    nn.functional.mse_loss(model(x), y).backward()
    for n, p in model.named_parameters():
        if isinstance(p.grad, DTensor):
            grad_placements[n] = str(p.grad.placements)
    result["grad_placements"] = grad_placements
    assert_exact(result)

    with partial_gradients_taken_as_local():
        model, opt = build()
        broken = train(model, opt, lambda step: local_batch(step, (0, 1), (rank, world)))
    assert_caught(broken, "partial gradients taken as local")
    result["negative_control"] = {k: broken[k] for k in ("weight_difference", "replicas_equal")}
    result["local_gradients_collectives"] = _check_local_gradients(mesh)
    return result


# ---------------------------------------------------------------------- 4 ranks: 2 x 2 mesh


def _fsdp_tp_model(mesh: DeviceMesh, **fsdp: Any) -> nn.Module:
    """TP on mesh["tp"], then FSDP2 on mesh["dp"]: ``head`` stays on the dp sub-mesh."""
    from torch.distributed.fsdp import fully_shard

    block = Block().float() if "mp_policy" in fsdp else Block()
    model = parallelize_module(block, mesh["tp"], tp_plan())
    for layer in (model.up, model.down, model.proj):
        fully_shard(layer, mesh=mesh["dp"], **fsdp)
    return fully_shard(model, mesh=mesh["dp"], **fsdp)


def _ddp_tp_model(mesh: DeviceMesh) -> tuple[nn.Module, nn.Module]:
    """TP on mesh["tp"], then DDP over mesh["dp"]: the parameters become local tensors."""
    model = parallelize_module(Block(), mesh["tp"], tp_plan())
    return nn.parallel.DistributedDataParallel(model, device_mesh=mesh["dp"]), model


def _refusals() -> list[str]:
    """Meshes TVLARS cannot reduce over with one all_reduce are refused with a ValueError."""
    mesh = init_device_mesh("cpu", (2, 2, 1), mesh_dim_names=("pp", "dp", "tp"))
    t = torch.zeros(4, dtype=torch.float64)
    cases = {
        # a "pipeline stage" mesh: 2-D, 2 of 4 ranks
        "pipeline": [distribute_tensor(t, mesh["dp", "tp"], [Shard(0), Replicate()])],
        # two sub-meshes, neither inside the other, and no parameter on a mesh holding both
        "not nested": [
            distribute_tensor(t, mesh["pp"], [Shard(0)]),
            distribute_tensor(t, mesh["dp"], [Shard(0)]),
        ],
    }
    messages = []
    for name, params in cases.items():
        try:
            ReductionPlan.build(params)
        except ValueError as err:
            messages.append(str(err))
        else:
            raise AssertionError(f"{name}: a mesh that needs more than one all_reduce passed")
    return messages


def _gathered(values: list[float]) -> list[list[float]]:
    """``values`` of every rank."""
    mine = torch.tensor(values, dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def _fp16_sharded_scaler(mesh: DeviceMesh, rank: int) -> dict[str, Any]:
    """FSDP2 + TP with fp16 compute and ``ShardedGradScaler``, against the float64 reference.

    Step 1 has an inf in rank 3's gradient shard only: every rank must skip it (the scaler
    all-reduces ``found_inf``) and halve its scale. Then one step without the scaler and an inf
    on rank 3 again: TVLARS's own skip, decided from the reduced norms, must be taken on every
    rank. Replicas stay bit-identical throughout.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    model = _fsdp_tp_model(mesh, mp_policy=policy)
    opt = make_optimizer(model)
    reference = Block()
    ref_opt = make_optimizer(reference)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**10)
    dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()

    def backward(step: int) -> None:
        x, y = local_batch(step, (dp, 2), (tp, 2))
        loss = nn.functional.mse_loss(model(x.float()).float(), y.float())  # fp16 output
        (scaler.scale(loss) if step < 3 else loss).backward()
        if step in (1, 3) and rank == 3:
            local_tensor(model.up.weight.grad).view(-1)[0] = float("inf")

    steps, scales = [], []
    for step in range(3):
        before = full_weights(opt)
        backward(step)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        steps.append(opt.step_count)
        scales.append(float(scaler.get_scale()))
        moved = [not torch.equal(before[n], w) for n, w in full_weights(opt).items()]
        assert all(moved) if step != 1 else not any(moved), (step, moved)
        if step != 1:
            x, y = batch(step)
            nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()  # on step 1 without gradients: t advances, as for a skipped step
        ref_opt.zero_grad()
    difference = max_relative_difference(full_weights(opt), reference)
    # fp16 compute, a sanity bound (the float64 runs check exactness): TVLARS measured 6e-3 after
    # 2 steps; LAMB 6.8e-2: Adam's first steps move every element by about lr whatever the size
    # of its gradient, so a gradient that fp16 rounds to 0 costs a whole step
    assert difference < (3e-2 if chosen_optimizer() == "tvlars" else 0.15), difference

    before = full_weights(opt)
    backward(3)
    opt.step()
    stats = opt.last_step_stats
    assert stats is not None
    skipped = _gathered([float(stats.skipped)])
    after = full_weights(opt)
    assert skipped == [[1.0]] * dist.get_world_size(), skipped
    assert all(torch.equal(before[n], after[n]) for n in before)
    decisions = _gathered([*steps, *scales])
    assert all(d == decisions[0] for d in decisions), decisions
    assert replicas_equal(after)
    return {
        "optimizer_steps": steps,
        "scales": scales,
        "weight_difference": difference,
        "tvlars_skip_on_every_rank": True,
    }


def mesh_2d_worker(rank: int, world: int, port: int, out: str, optimizer: str) -> None:
    use_optimizer(optimizer)
    init(rank, world, port)
    _write(out, _mesh_2d(rank))
    finish(dtensor=True)  # the models of the run above are released


def _mesh_2d(rank: int) -> dict[str, Any]:
    """On a (dp=2, tp=2) mesh: FSDP2 + TP with ``head`` on the dp sub-mesh; TP alone on the tp
    sub-mesh; TP + DDP; fp16 with ``ShardedGradScaler``; refused meshes.

    Negative controls: counting every copy of the dp sub-mesh (FSDP2 + TP) and local-shard
    norms (TP + DDP, what TVLARS did before) must fail the comparison.
    """
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()

    def share(step: int) -> tuple[Tensor, Tensor]:
        return local_batch(step, (dp, 2), (tp, 2))

    result: dict[str, Any] = {}
    model = _fsdp_tp_model(mesh)
    fsdp = train(model, make_optimizer(model), share)
    fsdp["placements"] = {
        n: [str(p.placements), str(p.device_mesh.mesh_dim_names)]
        for n, p in model.named_parameters()
    }
    assert_exact(fsdp)
    with every_copy_counted():
        model = _fsdp_tp_model(mesh)
        broken = train(model, make_optimizer(model), share)
    assert_caught(broken, "FSDP2 + TP with every copy of the dp sub-mesh counted")
    fsdp["negative_control"] = {k: broken[k] for k in ("weight_difference", "norm_difference")}
    result["fsdp2_tp"] = fsdp

    # TP alone on the tp sub-mesh, the dp ranks replicas fed the same batch: DTensor parameters
    # on a 1-D sub-mesh, norms summed over its group
    model = parallelize_module(Block(), mesh["tp"], tp_plan())
    sub_mesh = train(model, make_optimizer(model), lambda step: local_batch(step, (0, 1), (tp, 2)))
    assert_exact(sub_mesh)
    result["tp_sub_mesh"] = sub_mesh

    ddp, inner = _ddp_tp_model(mesh)
    opt = make_optimizer(inner)
    tp_ddp = train(ddp, opt, share)
    tp_ddp["placements"] = {
        n: str(getattr(p, "_st_info", "plain"))
        for group in opt.param_groups
        for n, p in zip(group["param_names"], group["params"], strict=True)
    }
    assert_exact(tp_ddp)
    with local_shard_norms():
        ddp, inner = _ddp_tp_model(mesh)
        broken = train(ddp, make_optimizer(inner), share)
    assert_caught(broken, "TP + DDP with local-shard norms")
    tp_ddp["negative_control"] = broken["weight_difference"]
    result["tp_ddp"] = tp_ddp

    result["fp16"] = _fp16_sharded_scaler(mesh, rank)
    result["refusals"] = _refusals()
    return result
