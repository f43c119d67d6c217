"""Shared fixtures: deterministic seeds, a headless matplotlib and a small model."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

# One intra-op thread in this process and in every process a test starts: the tests' tensors
# are tiny, and on a 2-core machine with anything else running, OpenMP threads spinning against
# each other make them 10-30x slower (a CLI fit went from 20 s past its 300 s timeout).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    """Seed every test, and let no test see the seed an earlier one left to Lightning.

    ``seed_everything`` stores its seed in ``PL_GLOBAL_SEED``; strategies that set up a process
    group re-seed from it, which would make a test's result depend on the tests before it.
    """
    os.environ.pop("PL_GLOBAL_SEED", None)
    random.seed(0)
    torch.manual_seed(0)
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)


@pytest.fixture
def small_model() -> torch.nn.Module:
    """A conv net with biases, BatchNorm and LayerNorm: every kind of parameter group."""
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3),
        torch.nn.BatchNorm1d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6, 5),
        torch.nn.LayerNorm(5),
        torch.nn.Linear(5, 3, bias=False),
    )


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated data sets go to a per-session cache, shared with spawned processes."""
    os.environ["LIGHTNING_TVLARS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let each distributed test pick a fresh free port."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)


TIERS = ("optim", "lightning", "distributed", "tools")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its tier, the folder it lives in (``pytest -m optim`` runs in
    seconds; CI runs them all)."""
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
