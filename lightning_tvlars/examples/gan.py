"""A small GAN on MNIST-1D: two networks, one TVLARS each, manual optimization.

The generator maps noise to 40-sample sequences, the discriminator scores sequences (the
non-saturating GAN loss). ``configure_optimizers`` calls
:func:`~lightning_tvlars.configure_tvlars` once per network, with ``parameters=`` choosing what
each optimizer trains and a config each (every field a CLI flag:
``--model.generator_tvlars.lr``). Each optimizer gets its own
:class:`~lightning_tvlars.TVLARSScheduler`: Lightning counts both optimizers' steps in
``max_steps``, so each is planned for its own share. ``TVLARSMonitor`` logs the generator's
optimizer under ``tvlars/`` and the discriminator's under ``tvlars_1/``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_tvlars.examples.mnist1d import SEQUENCE_LENGTH
from lightning_tvlars.lightning import configure_tvlars
from lightning_tvlars.recipe import TVLARSConfig

#: Defaults of the two optimizers (module-level instances: LightningCLI shows every field).
GENERATOR_TVLARS = TVLARSConfig(lr=0.5, weight_decay=0.0)
DISCRIMINATOR_TVLARS = TVLARSConfig(lr=0.5, weight_decay=0.0)


class GAN1D(pl.LightningModule):
    """Generator and discriminator MLPs on MNIST-1D sequences.

    Args:
        latent_dim: size of the generator's noise input.
        hidden: width of both networks.
        generator_tvlars: the generator's optimizer options.
        discriminator_tvlars: the discriminator's optimizer options.
    """

    def __init__(
        self,
        latent_dim: int = 16,
        hidden: int = 64,
        generator_tvlars: TVLARSConfig = GENERATOR_TVLARS,
        discriminator_tvlars: TVLARSConfig = DISCRIMINATOR_TVLARS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, SEQUENCE_LENGTH),
        )
        self.discriminator = nn.Sequential(
            nn.Linear(SEQUENCE_LENGTH, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, noise: Tensor) -> Tensor:
        """Sequences ``(batch, 1, length)`` from noise ``(batch, latent_dim)``."""
        return self.generator(noise).unsqueeze(1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        real = batch[0].flatten(1)
        g_opt, d_opt = self.optimizers()  # type: ignore[attr-defined]
        noise = torch.randn(len(real), self.hparams["latent_dim"], device=real.device)
        fake = self.generator(noise)
        bce = nn.functional.binary_cross_entropy_with_logits
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake.detach())
        d_loss = bce(real_logits, torch.ones_like(real_logits)) + bce(
            fake_logits, torch.zeros_like(fake_logits)
        )
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        # The discriminator is frozen while the generator learns, so its gradients stay those
        # its own step used (what TVLARSMonitor reports as tvlars_1/grad_norm/*).
        self.toggle_optimizer(g_opt)
        judged = self.discriminator(fake)
        g_loss = bce(judged, torch.ones_like(judged))  # non-saturating
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.untoggle_optimizer(g_opt)
        for scheduler in self.lr_schedulers():  # type: ignore[union-attr]
            scheduler.step()
        self.log_dict({"train/d_loss": d_loss, "train/g_loss": g_loss}, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return [
            configure_tvlars(self, self.hparams["generator_tvlars"], parameters=self.generator),
            configure_tvlars(
                self, self.hparams["discriminator_tvlars"], parameters=self.discriminator
            ),
        ]
