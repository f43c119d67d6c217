"""Worker functions for the multi-process tests (importable by spawned processes).

Each worker trains a sharded copy and an unsharded reference of the same model on the same
global batch, then asserts inside the worker; ``mp.spawn`` re-raises a failure in the test.

Each worker joins the process group, runs its body and leaves the group with ``finish``; the
models are the body's locals, released before the group is destroyed (see ``finish``).

Everything runs in float64: sharded training sums gradients and squared norms in another order
than one process does, which in float32 moves weights by ~1e-5 relative after a few steps (an
amount that depends on the torch build). In float64 the same reordering costs ~1e-16 relative per
operation, ~1e-13 after the steps here, so ``TOLERANCE`` can be tight while the error a real bug
makes (norms of local shards) is above 1e-2; ``fsdp2_worker`` checks that negative control too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from lightning_tvlars import LAMB, TVLARS, SigmoidPhase, param_groups

# Imported before any process group exists, it imports torch.distributed.nn, which would hold
# the group it finds for the life of the process (see lightning_tvlars.distributed).
from lightning_tvlars.distributed import end_process_group
from lightning_tvlars.optim.base import LayerwiseOptimizer

STEPS = 4
GLOBAL_BATCH = 16
TOLERANCE = {"rtol": 1e-9, "atol": 1e-12}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that starts its own process group: this one's, less
    ``MASTER_PORT``/``MASTER_ADDR`` (so that it picks a free port), one OpenMP thread, ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def mlp() -> nn.Sequential:
    """Uneven shapes: on 2 ranks Linear(3, 1) has an empty shard on rank 1."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)
    ).double()


#: The optimizers the workers run (the tests name one per spawn): TVLARS, LAMB with a phase, and
#: LAMB with a phase and the global gradient clip (active: the gradients' norm is above 0.05).
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]]], LayerwiseOptimizer]] = {
    "tvlars": lambda groups: TVLARS(
        groups, lr=3.0, trust_coefficient=1e-2, phase=SigmoidPhase(decay=0.5, delay=2)
    ),
    "lamb": lambda groups: LAMB(
        groups, lr=0.05, max_grad_norm=None, phase=SigmoidPhase(decay=0.5, delay=2)
    ),
    "lamb-clip": lambda groups: LAMB(
        groups, lr=0.05, max_grad_norm=0.05, phase=SigmoidPhase(decay=0.5, delay=2)
    ),
}
_CHOSEN = {"name": "tvlars"}


def use_optimizer(name: str) -> None:
    """Make :func:`make_optimizer` build ``name`` in this process (each worker calls it)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is invalid: expected one of {sorted(OPTIMIZERS)}")
    _CHOSEN["name"] = name


def chosen_optimizer() -> str:
    """The name :func:`make_optimizer` builds in this process."""
    return _CHOSEN["name"]


def make_optimizer(model: nn.Module) -> LayerwiseOptimizer:
    return OPTIMIZERS[_CHOSEN["name"]](param_groups(model, weight_decay=1e-2))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64)


def gloo_threads() -> list[str] | None:
    """This process's threads of gloo and its store (``pt_gloo_runloop``...); ``None`` where
    thread names cannot be read (no ``/proc``)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


def finish(*, dtensor: bool = False) -> None:
    """Leave the process group together, once the worker's models are released.

    A gloo group left to the interpreter's shutdown can abort the process ("terminate called
    without an active exception", docs/faq.md). Destroyed while nothing else holds it, the
    group is freed, which joins gloo's threads: none may be left. After DTensor
    (``dtensor=True``) the group outlives its destruction (torch's DTensor caches keep the
    device mesh, and the mesh its groups, for the life of the process): the worker then leaves
    without the interpreter's shutdown.
    """
    dist.barrier()
    end_process_group()
    if dtensor:
        exit_without_shutdown()
    assert not gloo_threads(), f"the process group outlived its destruction: {gloo_threads()}"


def exit_without_shutdown() -> NoReturn:
    """Exit with status 0 now, without the interpreter's shutdown (the results are written)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class CollectiveCounter:
    """Counts ``dist.all_reduce`` calls while active."""

    def __init__(self) -> None:
        self.count = 0
        self._original: Callable[..., object] = dist.all_reduce

    def __enter__(self) -> CollectiveCounter:
        def counting(*args: object, **kwargs: object) -> object:
            self.count += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._original  # type: ignore[assignment]


def train_pair(
    sharded: nn.Module,
    opt: LayerwiseOptimizer,
    reference: nn.Module,
    rank: int,
    replicas_per_batch: int,
) -> list[int]:
    """STEPS steps on both; ``sharded`` sees this rank's slice of the global batch.

    Returns the number of all_reduce calls inside each sharded ``optimizer.step()``.
    """
    ref_opt = make_optimizer(reference)
    per_rank = GLOBAL_BATCH // replicas_per_batch
    counts = []
    for step in range(STEPS):
        x, y = batch(step)
        lo = (rank % replicas_per_batch) * per_rank
        nn.functional.mse_loss(sharded(x[lo : lo + per_rank]), y[lo : lo + per_rank]).backward()
        with CollectiveCounter() as counter:
            opt.step()
        counts.append(counter.count)
        opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.step_count == STEPS
    return counts


def assert_close(full: dict[str, torch.Tensor], reference: nn.Module) -> None:
    for name, ref in reference.named_parameters():
        assert ref.dtype == torch.float64
        torch.testing.assert_close(full[name], ref.detach(), **TOLERANCE, msg=name)
    moved = sum(
        (a - b).abs().sum() for a, b in zip(reference.parameters(), mlp().parameters(), strict=True)
    )
    assert moved > 0.05, "the models did not train"


def _fully_sharded_mlp(mesh: object) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fsdp2_worker(
    rank: int, world: int, port: int, mesh_shape: tuple[int, ...], out: str, optimizer: str
) -> None:
    use_optimizer(optimizer)
    init(rank, world, port)
    _fsdp2(rank, world, mesh_shape, out)
    finish(dtensor=True)


def _fsdp2(rank: int, world: int, mesh_shape: tuple[int, ...], out: str) -> None:
    """fully_shard on a 1-D mesh (FSDP2) or a (replicate, shard) mesh (HSDP).

    Then the negative control: the same run with the norm reduction switched off (norms of local
    shards) must fail the comparison.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_tvlars.optim.norms import ReductionPlan

    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model, reference = _fully_sharded_mlp(mesh), mlp()
    counts = train_pair(model, make_optimizer(model), reference, rank, replicas_per_batch=world)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    assert_close(full, reference)

    reduce = ReductionPlan.reduce
    ReductionPlan.reduce = lambda self, local: local  # type: ignore[method-assign]
    try:
        broken, reference = _fully_sharded_mlp(mesh), mlp()
        train_pair(broken, make_optimizer(broken), reference, rank, replicas_per_batch=world)
    finally:
        ReductionPlan.reduce = reduce  # type: ignore[method-assign]
    try:
        assert_close({n: p.full_tensor() for n, p in broken.named_parameters()}, reference)
    except AssertionError:
        pass
    else:
        raise AssertionError("norms of local shards passed the comparison: it cannot fail")
    try:  # the compiled update is refused: its collectives would not be compiled
        TVLARS(model.parameters(), lr=1.0, compiled=True)  # refused when built
        compiled_refused = False
    except ValueError as err:
        compiled_refused = "compiled=True is not supported with sharded parameters" in str(err)
    local_sizes = [p.to_local().numel() for p in model.parameters()]
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "collectives": counts,
                    "placements": [str(p.placements) for p in model.parameters()],
                    "compiled_refused": compiled_refused,
                }
            )
        )
    if rank == world - 1:
        Path(out + f".sizes{rank}").write_text(json.dumps(local_sizes))


def fsdp1_worker(
    rank: int, world: int, port: int, use_orig_params: bool, out: str, optimizer: str
) -> None:
    use_optimizer(optimizer)
    init(rank, world, port)
    _fsdp1(rank, world, use_orig_params, out)
    finish()


def _fsdp1(rank: int, world: int, use_orig_params: bool, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model, reference = mlp(), mlp()
    wrapped = FSDP(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
    )
    if not use_orig_params:
        try:
            make_optimizer(wrapped)
        except ValueError as err:
            assert "FlatParameters are not supported" in str(err)
            Path(out).write_text(json.dumps({"refused": True}))
        return
    try:
        TVLARS(wrapped.parameters(), lr=1.0).step()  # grads None: nothing to do, no error
        unregistered = make_optimizer(wrapped)
        x = torch.randn(4, 5, dtype=torch.float64)
        nn.functional.mse_loss(wrapped(x), torch.zeros(4, 1, dtype=torch.float64)).backward()
        unregistered.step()
        raise AssertionError("an unregistered FSDP1 optimizer must refuse to step")
    except ValueError as err:
        assert "call optimizer.attach_fsdp" in str(err)
    wrapped.zero_grad()
    opt = make_optimizer(wrapped)
    opt.attach_fsdp(wrapped)
    opt.load_state_dict(opt.state_dict())  # as a resume does: the registration must stay
    counts = train_pair(wrapped, opt, reference, rank, replicas_per_batch=world)
    names = opt.param_groups[0]["param_names"]
    with FSDP.summon_full_params(wrapped):
        full = {
            n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
            for n, p in wrapped.named_parameters()
        }
    assert_close(full, reference)
    if rank == 0:
        Path(out).write_text(json.dumps({"collectives": counts, "names": names}))


def ddp_count_worker(rank: int, world: int, port: int, out: str, optimizer: str) -> None:
    use_optimizer(optimizer)
    init(rank, world, port)
    _ddp_count(rank, world, out)
    finish()


def _ddp_count(rank: int, world: int, out: str) -> None:
    """Under DDP parameters are full: the step needs no collective and matches the reference."""
    model, reference = mlp(), mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    counts = train_pair(ddp, make_optimizer(ddp), reference, rank, replicas_per_batch=world)
    assert_close(dict(model.named_parameters()), reference)
    if rank == 0:
        Path(out).write_text(json.dumps({"collectives": counts}))
