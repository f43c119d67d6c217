"""Small LightningModules for ``lightning-tvlars compare``'s tests, importable by class path
(``compare_models.Regression``) in this process and in subprocesses (``tests`` on the path)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def _data(samples: int) -> TensorDataset:
    """A fixed linear regression problem (the same whatever the global seed)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 8, generator=generator)
    y = x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(samples, generator=generator)
    return TensorDataset(x, y[:, None])


class RegressionData(pl.LightningDataModule):
    """``samples`` training and ``samples // 2`` validation pairs, batches of ``batch_size``."""

    def __init__(self, batch_size: int = 16, samples: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.samples = samples

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(self.samples), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(self.samples // 2), batch_size=self.batch_size)


class Regression(pl.LightningModule):
    """A small MLP; logs ``val_loss``; its own optimizer (SGD) is what compare replaces."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 1))

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Diverging(Regression):
    """Its training loss is NaN from the second step on."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        return loss * torch.nan if self.global_step >= 1 else loss


class OneManualOptimizer(Regression):
    """Manual optimization with one optimizer: comparable."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__(hidden)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = self.loss(batch)
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss.detach()


class TwoOptimizers(OneManualOptimizer):
    """Manual optimization with two optimizers: not comparable arm by arm."""

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1),
        ]
