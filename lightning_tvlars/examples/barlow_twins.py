"""Barlow Twins on MNIST-1D with lightly's projection head and loss, trained through the mixin.

Self-supervised pre-training is where the paper reports its largest gains (up to +10 points).
Two augmented views of each sequence go through a 1-D ResNet encoder and lightly's
``BarlowTwinsProjectionHead``; lightly's ``BarlowTwinsLoss`` pushes the cross-correlation of
the two embeddings towards the identity (off-diagonal weight 0.005, as in the paper).

Two modules:

* :class:`BarlowTwins1D` (``lightning.pytorch``): the benchmark's workload, also
  ``lightning-tvlars fit --model BarlowTwins1D``. The frozen encoder is evaluated by weighted
  k-nearest-neighbour classification (lightly's ``knn_predict``).
* :class:`LightlyBarlowTwins1D` (the standalone ``pytorch_lightning`` package, as in lightly's
  own examples): lightly's Barlow Twins recipe (:func:`lightning_tvlars.recipe.barlow_twins`;
  lightly's own warm-up + cosine form: :func:`~lightning_tvlars.recipe.
  barlow_twins_warmup_cosine`). Weights at ``0.2 x B/256`` with weight decay 1.5e-6; biases and
  normalization parameters at ``0.0048 x B/256`` (``lr_scale`` 0.024); an online linear
  classifier (lightly's ``OnlineLinearClassifier``, trained on detached features) with neither
  weight decay nor trust ratio, as a ``GroupOverride`` of the config.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytorch_lightning
import torch
import torchmetrics
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.utils.benchmarking import OnlineLinearClassifier, knn_predict
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_tvlars.examples.classifier import encoder
from lightning_tvlars.examples.mnist1d import NUM_CLASSES
from lightning_tvlars.lightning import TVLARSMixin
from lightning_tvlars.recipe import TVLARSConfig, barlow_twins

#: The defaults of ``BarlowTwins1D(tvlars=...)`` (a module-level instance: LightningCLI shows
#: every field; the mixin copies it into each module's hyper-parameters).
DEFAULT_TVLARS = TVLARSConfig()

#: lightly's Barlow Twins recipe with TVLARS (:func:`lightning_tvlars.recipe.barlow_twins`).
BARLOW_TWINS_TVLARS = barlow_twins()


def augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random view of a batch of 1-D sequences ``(batch, 1, length)``.

    Circular shift by up to 4 samples, amplitude scaling in [0.8, 1.2], Gaussian noise
    (sigma 0.1) and a masked (zeroed) segment of up to 8 samples, drawn per sequence.
    """
    batch, _, length = x.shape
    device = x.device
    shifts = torch.randint(-4, 5, (batch,), generator=generator, device=device)
    index = (torch.arange(length, device=x.device) - shifts[:, None]) % length
    x = x.gather(2, index[:, None, :])
    x = x * torch.empty(batch, 1, 1, device=x.device).uniform_(0.8, 1.2, generator=generator)
    x = x + 0.1 * torch.randn(x.shape, generator=generator, device=device)
    start = torch.randint(0, length, (batch, 1), generator=generator, device=device)
    width = torch.randint(0, 9, (batch, 1), generator=generator, device=device)
    position = torch.arange(length, device=x.device)[None, :]
    mask = (position >= start) & (position < start + width)
    return x.masked_fill(mask[:, None, :], 0.0)


class BarlowTwins1D(TVLARSMixin, pl.LightningModule):
    """Barlow Twins pre-training of the MNIST-1D encoder.

    Args:
        width, blocks: encoder size (features are ``2 * width``).
        projection_dim: hidden and output size of the projection head (the paper: 4096).
        lambda_param: off-diagonal weight of the Barlow Twins loss.
        tvlars: optimizer, phase and scaling options.
    """

    def __init__(
        self,
        width: int = 16,
        blocks: int = 1,
        projection_dim: int = 256,
        lambda_param: float = 5e-3,
        tvlars: TVLARSConfig = DEFAULT_TVLARS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = encoder(width, blocks)
        self.projection_head = BarlowTwinsProjectionHead(2 * width, projection_dim, projection_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def _loss(self, x: Tensor) -> Tensor:
        z0 = self.projection_head(self.encoder(augment(x)))
        z1 = self.projection_head(self.encoder(augment(x)))
        return self.criterion(z0, z1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch[0])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch[0]), prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def features(self, loader: DataLoader) -> tuple[Tensor, Tensor]:
        """L2-normalised encoder features and labels of a whole loader (eval mode)."""
        was_training = self.training
        self.eval()
        feats, labels = [], []
        for x, y in loader:
            feats.append(nn.functional.normalize(self.encoder(x.to(self.device)), dim=1))
            labels.append(y.to(self.device))
        self.train(was_training)
        return torch.cat(feats), torch.cat(labels)

    def knn_accuracy(self, bank: DataLoader, queries: DataLoader, k: int = 20) -> float:
        """Top-1 accuracy of weighted kNN on frozen features (``bank`` gives the neighbours)."""
        bank_features, bank_labels = self.features(bank)
        query_features, query_labels = self.features(queries)
        accuracy = torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")
        for chunk, labels in zip(query_features.split(1024), query_labels.split(1024), strict=True):
            ranked = knn_predict(chunk, bank_features.T, bank_labels, NUM_CLASSES, knn_k=k)
            accuracy.update(ranked[:, 0], labels)
        return float(accuracy.compute())


class LightlyBarlowTwins1D(TVLARSMixin, pytorch_lightning.LightningModule):
    """lightly's Barlow Twins recipe on ``pytorch_lightning``, with TVLARS (module docstring).

    Args:
        width, blocks: encoder size (features are ``2 * width``).
        projection_dim: hidden and output size of the projection head.
        lambda_param: off-diagonal weight of the Barlow Twins loss.
        tvlars: the optimizer options (lightly's recipe by default, see
            ``BARLOW_TWINS_TVLARS``).
    """

    def __init__(
        self,
        width: int = 16,
        blocks: int = 1,
        projection_dim: int = 256,
        lambda_param: float = 5e-3,
        tvlars: TVLARSConfig = BARLOW_TWINS_TVLARS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = encoder(width, blocks)
        self.projection_head = BarlowTwinsProjectionHead(2 * width, projection_dim, projection_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param)
        self.online_classifier = OnlineLinearClassifier(
            feature_dim=2 * width, num_classes=NUM_CLASSES, topk=(1,)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, targets = batch
        features = self.encoder(augment(x))
        z0 = self.projection_head(features)
        z1 = self.projection_head(self.encoder(augment(x)))
        loss = self.criterion(z0, z1)
        # the classifier reads detached features: it never trains the encoder
        cls_loss, cls_log = self.online_classifier.training_step((features, targets), batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(cls_log)
        return loss + cls_loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, targets = batch
        cls_loss, cls_log = self.online_classifier.validation_step(
            (self.encoder(x), targets), batch_idx
        )
        self.log_dict(cls_log, prog_bar=True)
        return cls_loss
