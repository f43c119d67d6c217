"""Small LightningModules and data for the Lightning tests (top level: picklable for spawn)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tvlars import TVLARSConfig, TVLARSMixin, TVLARSMonitor

#: The run that distributed strategies must reproduce exactly (6 steps of 16 samples).
EQUIVALENCE_CONFIG = TVLARSConfig(lr=2.0, base_batch_size=16, decay=0.2, delay=3, weight_decay=1e-3)


def regression_data(n: int = 256, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = x @ torch.randn(6, 2, generator=gen) + 0.1 * torch.randn(n, 2, generator=gen)
    return TensorDataset(x, y)


class TinyRegressor(TVLARSMixin, pl.LightningModule):
    """Linear, LayerNorm, Linear: per-sample normalisation only, so data parallelism is exact."""

    def __init__(
        self,
        tvlars: TVLARSConfig | None = None,
        batch_size: int = 16,
        deterministic_sampler: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        data = regression_data()
        if not self.hparams.deterministic_sampler:
            return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=True)
        kwargs: dict[str, Any] = getattr(self.trainer.strategy, "distributed_sampler_kwargs", {})
        sampler = DistributedSampler(data, shuffle=False, **kwargs) if kwargs else None
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)


def equivalence_trainer(devices: int, strategy: Any, **kwargs: Any) -> pl.Trainer:
    """6 steps on CPU with a deterministic sampler (``use_distributed_sampler=False``)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[TVLARSMonitor(log_every_n_steps=2)],
        **kwargs,
    )
