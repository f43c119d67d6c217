"""Train TinyRegressor under a Lightning strategy on CPU and save the full weights (rank 0).

Usage: python lightning_sharded.py {single,fsdp2,fsdp1,fsdp2-local-norms} OUT.pt [lars|lamb]

``fsdp2-local-norms`` is the negative control: FSDP2 with the norm reduction switched off, so
that each rank uses the norms of its local shards.
Run as a script because Lightning's FSDP/ModelParallel launchers re-execute the command line.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_workers import exit_without_shutdown
from lightning_helpers import EQUIVALENCE_CONFIG, TinyRegressor, equivalence_trainer

from lightning_tvlars import LAMB, TVLARS
from lightning_tvlars.distributed import end_process_group
from lightning_tvlars.optim.groups import clean_name


class ShardedRegressor(TinyRegressor):
    def configure_model(self) -> None:
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)


def cpu_fsdp1_strategy() -> pl.strategies.Strategy:
    """Lightning refuses FSDP on CPU; FSDP1 itself runs there with device_id=cpu (tests only).

    Lightning's FSDP precision plugins cast the module to float32 at best; this one keeps the
    float64 module of the equivalence test as it is.
    """
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    class Float64FSDPPrecision(FSDPPrecision):
        def convert_module(self, module: nn.Module) -> nn.Module:
            return module

        def convert_input(self, data: object) -> object:
            return data

        @property
        def mixed_precision_config(self) -> MixedPrecision:
            return MixedPrecision(torch.float64, torch.float64, torch.float64)

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: nn.Module) -> nn.Module:
            return FullyShardedDataParallel(
                module=model,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )

    return CPUFSDPStrategy(
        precision_plugin=Float64FSDPPrecision("32-true"),
        process_group_backend="gloo",
        timeout=timedelta(seconds=60),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
    )


#: The configurations trained: the equivalence test's TVLARS, and LAMB with its global clip.
CONFIGS = {
    "lars": EQUIVALENCE_CONFIG,
    "lamb": replace(
        EQUIVALENCE_CONFIG, optimizer="lamb", lr=0.05, weight_decay=1e-3, max_grad_norm=0.5
    ),
}


def main(kind: str, out: str, optimizer: str = "lars") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    devices, per_device = (1, 16) if kind == "single" else (2, 8)
    strategy: object = "auto"
    if kind == "fsdp2-local-norms":
        from lightning_tvlars.optim.norms import ReductionPlan

        ReductionPlan.reduce = lambda self, local: local  # type: ignore[method-assign]
        kind = "fsdp2"
    if kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60)
        )
    elif kind == "fsdp1":
        strategy = cpu_fsdp1_strategy()
    model = ShardedRegressor(
        tvlars=CONFIGS[optimizer],
        batch_size=per_device,
        deterministic_sampler=True,
        double=True,
    )
    trainer = equivalence_trainer(devices, strategy)
    trainer.fit(model)
    family = optimizer
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is {"lars": TVLARS, "lamb": LAMB}[family] and optimizer.step_count == 6
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
            weights = {clean_name(n): p.detach().clone() for n, p in model.named_parameters()}
    else:
        weights = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()
        }
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    if trainer.is_global_zero:
        torch.save(
            {"weights": weights, "names": names, "batch": model.tvlars_plan.effective_batch_size},
            out,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Every rank is done: leave the process group together (docs/faq.md). Under FSDP2
    # (ModelParallelStrategy) the group outlives its destruction (DTensor's caches keep it), and
    # its gloo threads can abort the interpreter's shutdown: leave without that shutdown.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    end_process_group()
    exit_without_shutdown()
