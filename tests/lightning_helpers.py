"""Small LightningModules and data for the Lightning tests (top level: picklable for spawn)."""

from __future__ import annotations

import atexit
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from dist_workers import gloo_threads
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tvlars import PhaseConfig, TVLARSConfig, TVLARSMixin, TVLARSMonitor
from lightning_tvlars.optim.base import LayerwiseOptimizer

#: rtol / atol of the float64 equivalence checks: a reduction-order difference of ~1e-16 per
#: operation, amplified by 6 steps of the chain rule and the trust ratio, stays below 1e-12;
#: 1e-9 leaves three orders of margin and is seven orders below what a real error gives.
EQUIVALENCE_TOLERANCE = {"rtol": 1e-9, "atol": 1e-12}

#: The run that distributed strategies must reproduce exactly (6 steps of 16 samples).
EQUIVALENCE_CONFIG = TVLARSConfig(
    lr=2.0,
    base_batch_size=16,
    weight_decay=1e-3,
    phase=PhaseConfig(mode="explicit", decay=0.2, delay=3),
)


def regression_data(
    n: int = 256, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = x @ torch.randn(6, 2, generator=gen) + 0.1 * torch.randn(n, 2, generator=gen)
    return TensorDataset(x.to(dtype), y.to(dtype))


class TinyRegressor(TVLARSMixin, pl.LightningModule):
    """Linear, LayerNorm, Linear: per-sample normalisation only, so data parallelism is exact."""

    def __init__(
        self,
        tvlars: TVLARSConfig | None = None,
        batch_size: int = 16,
        deterministic_sampler: bool = False,
        double: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
        if double:
            self.net.double()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        data = regression_data(dtype=torch.float64 if self.hparams.double else torch.float32)
        if not self.hparams.deterministic_sampler:
            return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=True)
        kwargs: dict[str, Any] = getattr(self.trainer.strategy, "distributed_sampler_kwargs", {})
        sampler = DistributedSampler(data, shuffle=False, **kwargs) if kwargs else None
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)


def cpu_trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    """A quiet one-process CPU Trainer (no logger, checkpoints, progress bar or summary)."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**defaults, **kwargs})


class Record(pl.Callback):
    """Per optimizer step of every optimizer of the family (TVLARS, LAMB): ``(t, phi, lr)`` as
    applied (the first adapted tensor's rate), and each tensor's rate as its group showed it at
    the start of every batch before step ``t`` (what a logger or a user reads there)."""

    def __init__(self) -> None:
        self.steps: dict[int, list[tuple[int, float, float]]] = {}
        self.applied: dict[int, dict[int, dict[int, float]]] = {}
        self.shown: dict[int, dict[int, list[dict[int, float]]]] = {}

    @staticmethod
    def _family(trainer: pl.Trainer) -> list[tuple[int, LayerwiseOptimizer]]:
        optimizers = enumerate(trainer.optimizers)
        return [(i, o) for i, o in optimizers if isinstance(o, LayerwiseOptimizer)]

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        for index, opt in self._family(trainer):
            rates = {id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"]}
            self.shown.setdefault(index, {}).setdefault(opt.step_count, []).append(rates)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        for index, opt in self._family(trainer):
            stats = opt.last_step_stats
            rows = self.steps.setdefault(index, [])
            if stats is not None and stats.params and (not rows or rows[-1][0] != stats.step):
                lr = next(lr for lr, a in zip(stats.lr, stats.adapted, strict=True) if a)
                rows.append((stats.step, float(stats.phase), lr))
                applied = {id(p): float(r) for p, r in zip(stats.params, stats.lr, strict=True)}
                self.applied.setdefault(index, {})[stats.step] = applied

    def phases(self, index: int = 0) -> list[float]:
        return [phi for _, phi, _ in self.steps[index]]

    def lrs(self, index: int = 0) -> list[float]:
        return [lr for _, _, lr in self.steps[index]]

    def assert_applied_as_shown(self, index: int = 0) -> None:
        """Every step applied exactly the rates its groups showed before it (at the start of
        each of its batches)."""
        applied, shown = self.applied[index], self.shown[index]
        assert applied, "no step was recorded"
        for t, rates in applied.items():
            assert t in shown, f"step {t}: no batch started before it"
            for seen in shown[t]:
                assert {k: seen[k] for k in rates} == rates, f"step {t}: {seen} != {rates}"


#: The forms of the family the run-change tests run with: TVLARS (a phase fitted to the run,
#: constant LR), and the warm-up forms (LARS and LAMB without a phase: a linear warm-up over
#: a quarter of the run, then a cosine).
FORMS: dict[str, dict[str, Any]] = {
    "tvlars": {},
    "warmup": {"phase": PhaseConfig(mode="off"), "warmup_fraction": 0.25, "lr_schedule": "cosine"},
    "lamb-warmup": {
        "optimizer": "lamb",
        "phase": PhaseConfig(mode="off"),
        "warmup_fraction": 0.25,
        "lr_schedule": "cosine",
    },
}


def form(name: str, **options: Any) -> TVLARSConfig:
    """The config of form ``name`` with ``options`` on top."""
    return TVLARSConfig(**{**FORMS[name], **options})


def warmup_cosine(t: int, total: int, final: float = 1e-3, fraction: float = 0.25) -> float:
    """The warm-up forms' LR factor at step ``t`` of a ``total``-step run, written out: a linear
    rise ``(t + 1) / (w + 1)`` over ``w = round(fraction x total)`` steps, then a cosine from 1
    to ``final`` at ``total``."""
    w = round(fraction * total)
    if t < w:
        return (t + 1) / (w + 1)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))


class MemoryLogger(Logger):
    """A logger that keeps ``(step, metrics)`` in memory (for monitors in distributed tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def equivalence_trainer(devices: int, strategy: Any, **kwargs: Any) -> pl.Trainer:
    """6 steps on CPU with a deterministic sampler (``use_distributed_sampler=False``).

    The modules and data are float64 (``TinyRegressor(double=True)``; Lightning's
    ``ModelParallelStrategy`` refuses ``precision="64-true"``): the distributed runs sum
    gradients and squared norms in another order than one process does, and in float32 that
    reordering alone moves weights by ~1e-5 relative after a few steps at a large learning
    rate, an amount that differs between torch builds. In float64 the same reordering is
    ~1e-15 relative per operation, so the comparisons can be tight (``EQUIVALENCE_TOLERANCE``)
    while an actual error (norms of local shards instead of whole tensors) still moves
    weights by more than 1e-2.
    """
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=6,
        logger=MemoryLogger(),  # the monitor needs one; its gradient norms take a collective
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[TVLARSMonitor(log_every_n_steps=2)],
        **kwargs,
    )


def report_gloo_threads_at_exit(path: Path) -> None:
    """At exit, write the gloo threads still alive to ``path`` (JSON).

    ``atexit`` runs the last registered handler first: registered before the package's
    (``EndProcessGroupAtExit`` at fit end, the example at the end of its loop), this runs after
    it, just before the interpreter shuts down.
    """
    atexit.register(lambda: path.write_text(json.dumps(gloo_threads())))


def gloo_threads_at_exit(folder: Path) -> dict[int, list[str] | None]:
    """What ``report_gloo_threads_at_exit`` wrote, by rank (files ``folder/rank<N>.json``)."""
    return {
        int(p.stem.removeprefix("rank")): json.loads(p.read_text())
        for p in folder.glob("rank*.json")
    }


class GlooThreadsAtExit(pl.Callback):
    """Reports each rank's gloo threads at exit (``folder/rank<N>.json``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report_gloo_threads_at_exit(self.folder / f"rank{trainer.global_rank}.json")


def fabric_example_reporting_gloo_threads(fabric: Any, folder: Path, **kwargs: Any) -> Any:
    """The Fabric example's ``train``, with each rank's gloo threads reported at exit."""
    from lightning_tvlars.examples import fabric_mnist1d

    report_gloo_threads_at_exit(folder / f"rank{fabric.global_rank}.json")
    return fabric_mnist1d.train(fabric, **kwargs)
