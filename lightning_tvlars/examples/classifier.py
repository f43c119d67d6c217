"""A small 1-D residual CNN for MNIST-1D, trained with TVLARS through ``TVLARSMixin``."""

from __future__ import annotations

from typing import cast

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn

from lightning_tvlars._validation import check_non_negative_int, check_positive_int
from lightning_tvlars.examples.mnist1d import NUM_CLASSES
from lightning_tvlars.lightning import TVLARSMixin
from lightning_tvlars.recipe import TVLARSConfig


class ResidualBlock1d(nn.Module):
    """``x + BN(conv(ReLU(BN(conv(x)))))``, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm1d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def encoder(width: int = 32, blocks: int = 2) -> nn.Sequential:
    """Conv stem, residual blocks, two poolings; outputs ``(batch, 2 * width)`` features."""
    check_positive_int("width", width)
    check_non_negative_int("blocks", blocks)
    return nn.Sequential(
        nn.Conv1d(1, width, 5, padding=2, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        *[ResidualBlock1d(width) for _ in range(blocks)],
        nn.MaxPool1d(2),
        nn.Conv1d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm1d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
    )


#: The defaults of ``MNIST1DClassifier(tvlars=...)`` (a module-level instance: LightningCLI's
#: ``--help`` and ``--print_config`` show every field; the mixin copies it per module).
DEFAULT_TVLARS = TVLARSConfig()


class MNIST1DClassifier(TVLARSMixin, pl.LightningModule):
    """1-D ResNet classifier; ``configure_optimizers`` comes from :class:`TVLARSMixin`.

    Args:
        width: channels of the residual stage (features are ``2 * width``).
        blocks: residual blocks.
        tvlars: optimizer, phase and scaling options (every field is a CLI flag).
    """

    def __init__(
        self, width: int = 32, blocks: int = 2, tvlars: TVLARSConfig = DEFAULT_TVLARS
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = encoder(width, blocks)
        self.head = nn.Linear(2 * width, NUM_CLASSES)
        self.metrics = nn.ModuleDict(
            {
                stage: torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")
                for stage in ("train_", "val_", "test_")  # "train" is a reserved ModuleDict key
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        accuracy = cast(torchmetrics.Metric, self.metrics[f"{stage}_"])
        accuracy(logits, y)
        # validation and test losses are epoch means: averaged over the ranks too under DDP
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train")
        self.log(f"{stage}/acc", accuracy, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")
