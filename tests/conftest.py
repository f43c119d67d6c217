"""Shared fixtures: deterministic seeds, a headless matplotlib and a small model."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


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
