"""MNIST-1D, the embedded data set: generated locally, cached on disk, deterministic by seed.

MNIST-1D (Greydanus & Kobak, 2020) turns ten 1-D digit templates into 40-sample sequences with
random padding, shear, scaling, correlated noise and translation. It is generated here with
``mnist1d.data.make_dataset`` (never downloaded). With the default 70,000 samples the split is
55,000 train / 5,000 validation / 10,000 test. Generation takes about half a minute once; the
arrays are cached as ``.npz`` under ``$LIGHTNING_TVLARS_CACHE`` (default
``~/.cache/lightning_tvlars``); once cached, ``mnist1d`` is not imported.

The noise of the generator can be raised for a harder task (``corr_noise_scale``, the scale of
correlated noise, default 0.25, and ``iid_noise_scale``, per-sample Gaussian noise, default
0.02); the cache file name then records both.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset

from lightning_tvlars._validation import check_positive_int

SEQUENCE_LENGTH = 40
NUM_CLASSES = 10


def cache_dir() -> Path:
    """Where generated data sets are cached."""
    default = Path.home() / ".cache" / "lightning_tvlars"
    return Path(os.environ.get("LIGHTNING_TVLARS_CACHE", default))


def _check_noise(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a number >= 0 or None")
    return float(value)


def _format(value: float | None) -> str:
    return "default" if value is None else f"{value:g}"


def cache_path(
    num_samples: int,
    seed: int,
    corr_noise_scale: float | None = None,
    iid_noise_scale: float | None = None,
) -> Path:
    """The cache file of a generated data set (the generator's defaults keep the short name)."""
    noise = ""
    if corr_noise_scale is not None or iid_noise_scale is not None:
        noise = f"-corr{_format(corr_noise_scale)}-iid{_format(iid_noise_scale)}"
    return cache_dir() / f"mnist1d-{num_samples}-seed{seed}{noise}.npz"


def generate(
    num_samples: int,
    seed: int,
    *,
    corr_noise_scale: float | None = None,
    iid_noise_scale: float | None = None,
) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with ``num_samples`` samples (80% train, 20% test); cached on disk.

    Args:
        num_samples: total samples.
        seed: generation seed.
        corr_noise_scale, iid_noise_scale: the generator's noise scales; ``None`` keeps its
            default (0.25 and 0.02).
    """
    check_positive_int("num_samples", num_samples)
    corr = _check_noise("corr_noise_scale", corr_noise_scale)
    iid = _check_noise("iid_noise_scale", iid_noise_scale)
    path = cache_path(num_samples, seed, corr, iid)
    if path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(
            f"{path} is not cached and generating it needs mnist1d (pip install mnist1d), or "
            "copy the cached file there (LIGHTNING_TVLARS_CACHE sets the folder)"
        ) from err

    rank_zero_info(f"Generating MNIST-1D ({num_samples} samples, seed {seed}) into {path} ...")
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    if corr is not None:
        args.corr_noise_scale = corr
    if iid is not None:
        args.iid_noise_scale = iid
    raw = make_dataset(args)
    data = {
        "x": raw["x"].astype(np.float32),
        "y": raw["y"].astype(np.int64),
        "x_test": raw["x_test"].astype(np.float32),
        "y_test": raw["y_test"].astype(np.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    return data


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D train / validation / test loaders.

    Args:
        batch_size: per-device batch size.
        num_samples: total generated samples (80% train + validation, 20% test).
        val_size: samples held out of the training split for validation (model selection).
        seed: generation seed (the data set is a pure function of it, ``num_samples`` and
            the noise scales).
        num_workers: DataLoader workers (0 is fastest for these in-memory tensors).
        corr_noise_scale, iid_noise_scale: the generator's noise scales (``None``: its
            defaults, 0.25 and 0.02); higher values make a harder task.
    """

    def __init__(
        self,
        batch_size: int = 512,
        num_samples: int = 70_000,
        val_size: int = 5_000,
        seed: int = 42,
        num_workers: int = 0,
        corr_noise_scale: float | None = None,
        iid_noise_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("num_samples", num_samples)
        if not 0 < val_size < 0.8 * num_samples:
            raise ValueError(
                f"val_size={val_size!r} is invalid: expected 0 < val_size < 80% of "
                f"num_samples={num_samples!r}"
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_samples, self.val_size, self.seed = num_samples, val_size, seed
        self.num_workers = num_workers
        self.noise = {
            "corr_noise_scale": _check_noise("corr_noise_scale", corr_noise_scale),
            "iid_noise_scale": _check_noise("iid_noise_scale", iid_noise_scale),
        }
        self.splits: dict[str, TensorDataset] = {}

    def prepare_data(self) -> None:
        generate(self.num_samples, self.seed, **self.noise)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = generate(self.num_samples, self.seed, **self.noise)
        x, y = torch.from_numpy(data["x"]).unsqueeze(1), torch.from_numpy(data["y"])
        val = self.val_size
        self.splits = {
            "train": TensorDataset(x[:-val], y[:-val]),
            "val": TensorDataset(x[-val:], y[-val:]),
            "test": TensorDataset(
                torch.from_numpy(data["x_test"]).unsqueeze(1), torch.from_numpy(data["y_test"])
            ),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
