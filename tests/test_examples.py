"""The runnable examples run and learn."""

from __future__ import annotations

import pytest

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
