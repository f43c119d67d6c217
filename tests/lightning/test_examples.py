"""The runnable examples run and learn."""

from __future__ import annotations

import pytest
import torch

from lightning_tvlars.examples import plain_pytorch


def test_plain_pytorch_example_learns(capsys: pytest.CaptureFixture[str]) -> None:
    accuracy = plain_pytorch.main(steps=60, batch_size=1024)
    assert accuracy > 0.9
    out = capsys.readouterr().out
    assert "phi" in out and "training accuracy" in out


def test_mnist1d_is_generated_once_cached_and_deterministic(tmp_path, monkeypatch) -> None:
    import numpy as np

    from lightning_tvlars.examples import mnist1d

    monkeypatch.setenv("LIGHTNING_TVLARS_CACHE", str(tmp_path))
    first = mnist1d.generate(500, seed=3)
    (cached,) = tmp_path.glob("mnist1d-500-seed3.npz")
    assert first["x"].shape == (400, 40) and first["x_test"].shape == (100, 40)
    assert first["x"].dtype == np.float32 and set(first["y"]) <= set(range(10))
    again = mnist1d.generate(500, seed=3)  # from the cache
    assert all(np.array_equal(first[k], again[k]) for k in first)
    cached.unlink()
    regenerated = mnist1d.generate(500, seed=3)
    assert np.array_equal(first["x"], regenerated["x"])
    assert not np.array_equal(first["x"], mnist1d.generate(500, seed=4)["x"])


def test_data_module_splits() -> None:
    import pytest

    from lightning_tvlars.examples.mnist1d import MNIST1DDataModule

    data = MNIST1DDataModule(batch_size=64, num_samples=1000, val_size=100)
    data.prepare_data()
    data.setup()
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [700, 100, 200]
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (64, 1, 40) and y.shape == (64,)
    with pytest.raises(ValueError, match="val_size=900 is invalid"):
        MNIST1DDataModule(num_samples=1000, val_size=900)


def test_augment_views_differ_keep_shape_and_are_seedable() -> None:
    import torch

    from lightning_tvlars.examples.barlow_twins import augment

    x = torch.randn(32, 1, 40)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)


def test_barlow_twins_learns_features_better_than_chance(tmp_path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_tvlars import TVLARSConfig
    from lightning_tvlars.examples.barlow_twins import BarlowTwins1D
    from lightning_tvlars.examples.mnist1d import MNIST1DDataModule

    pl.seed_everything(0)
    data = MNIST1DDataModule(batch_size=256, num_samples=3000, val_size=300)
    data.prepare_data()
    data.setup()
    model = BarlowTwins1D(tvlars=TVLARSConfig(lr=1.0))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    bank = DataLoader(data.splits["train"], batch_size=1024)
    accuracy = model.knn_accuracy(bank, data.test_dataloader())
    assert 0.2 < accuracy <= 1.0  # 10 classes: chance is 0.1


def test_gan_example_trains_each_network_with_its_own_tvlars(tmp_path) -> None:
    import csv
    from pathlib import Path

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_tvlars import TVLARS, TVLARSMonitor, TVLARSScheduler
    from lightning_tvlars.examples.gan import GAN1D
    from lightning_tvlars.examples.mnist1d import MNIST1DDataModule

    pl.seed_everything(0)
    model = GAN1D()
    data = MNIST1DDataModule(batch_size=128, num_samples=2000, val_size=200)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=20,  # Lightning counts both optimizers' steps: 10 each
        limit_val_batches=0,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path),
        callbacks=[TVLARSMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    g_opt, d_opt = trainer.optimizers
    assert isinstance(g_opt, TVLARS) and isinstance(d_opt, TVLARS)
    for optimizer, network in ((g_opt, model.generator), (d_opt, model.discriminator)):
        assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
            id(p) for p in network.parameters()
        }
        assert optimizer.step_count == 10
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 128 / 256)
    plans = [c.scheduler.plan for c in trainer.lr_scheduler_configs]
    assert all(isinstance(c.scheduler, TVLARSScheduler) for c in trainer.lr_scheduler_configs)
    assert [p.total_steps for p in plans] == [10, 10]
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("tvlars/phase") for r in rows) and any(r.get("tvlars_1/phase") for r in rows)
    assert "tvlars/trust_ratio/0.weight" in rows[0] and "tvlars_1/trust_ratio/2.weight" in rows[0]
    assert model(torch.randn(4, 16)).shape == (4, 1, 40)


def test_lightly_recipe_groups_and_training_under_pytorch_lightning(tmp_path) -> None:
    import pytorch_lightning
    from pytorch_lightning.loggers import CSVLogger
    from torch import nn

    from lightning_tvlars import TVLARS, TVLARSMonitor
    from lightning_tvlars.examples.barlow_twins import LightlyBarlowTwins1D
    from lightning_tvlars.examples.mnist1d import MNIST1DDataModule

    pytorch_lightning.seed_everything(0)
    data = MNIST1DDataModule(batch_size=128, num_samples=2000, val_size=200)
    data.prepare_data()
    data.setup()
    model = LightlyBarlowTwins1D()
    trainer = pytorch_lightning.Trainer(
        accelerator="cpu",
        max_steps=3,
        val_check_interval=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[TVLARSMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data.train_dataloader(), data.val_dataloader())
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, TVLARS) and optimizer.step_count == 3
    # What the recipe intends, from the module itself: classifier / biases and norms / weights.
    norms = {
        f"{m}.{p}" if m else p
        for m, module in model.named_modules()
        for p, _ in module.named_parameters(recurse=False)
        if isinstance(module, nn.modules.batchnorm._NormBase) or p == "bias"
    }
    classifier = {n for n, _ in model.named_parameters() if n.startswith("online_classifier.")}
    weights = {n for n, _ in model.named_parameters()} - norms - classifier
    assert classifier == {
        "online_classifier.classification_head.weight",
        "online_classifier.classification_head.bias",
    }
    assert "projection_head.layers.6.bias" in norms and "encoder.1.weight" in norms
    base = 0.2 * 128 / 256  # lightly: 0.2 x B / 256
    expected = {
        "weights": (weights, True, 1.5e-6, base),
        "biases and norms": (norms - classifier, False, 0.0, 0.0048 * 128 / 256),
        "online classifier": (classifier, False, 0.0, base),
    }
    for what, (names, adapt, decay, lr) in expected.items():
        groups = [g for g in optimizer.param_groups if set(g["param_names"]) & names]
        assert {n for g in groups for n in g["param_names"]} == names, what
        for group in groups:
            assert (group["adapt"], group["weight_decay"]) == (adapt, decay), what
            assert group["lr"] == pytest.approx(lr), what
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val_online_cls_top1" in metrics
    assert float(metrics["tvlars/lr"]) == pytest.approx(base)
