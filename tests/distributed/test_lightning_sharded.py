"""Lightning strategies that shard parameters give the weights of single-process training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_workers import launcher_env
from lightning_helpers import EQUIVALENCE_TOLERANCE

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).parent.parent / "scripts" / "lightning_sharded.py"


def _run(kind: str, tmp_path: Path, optimizer: str = "lars") -> dict:
    out = tmp_path / f"{kind}-{optimizer}.pt"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), kind, str(out), optimizer],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run("single", tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def single_lamb(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run("single", tmp_path_factory.mktemp("single"), "lamb")


@pytest.mark.parametrize(
    ("kind", "optimizer"), [("fsdp2", "lars"), ("fsdp1", "lars"), ("fsdp1", "lamb")]
)
def test_sharded_strategy_matches_single_process(
    kind: str, optimizer: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    single = request.getfixturevalue("single" if optimizer == "lars" else "single_lamb")
    sharded = _run(kind, tmp_path, optimizer)
    assert sharded["batch"] == single["batch"] == 16  # 2 replicas x 8 == 1 x 16
    assert sharded["names"] == single["names"]  # groups keep the user's names under FSDP
    # float64 runs (see equivalence_trainer): only the summation order differs.
    for name, weight in single["weights"].items():
        assert weight.dtype == torch.float64
        torch.testing.assert_close(sharded["weights"][name], weight, **EQUIVALENCE_TOLERANCE)


def test_the_comparison_fails_on_local_shard_norms(single: dict, tmp_path: Path) -> None:
    """Negative control: norms of local shards (the bug) are far outside the tolerance."""
    broken = _run("fsdp2-local-norms", tmp_path)
    errors = [
        float(((broken["weights"][name] - weight).abs() / weight.abs().clamp_min(1e-3)).max())
        for name, weight in single["weights"].items()
    ]
    assert max(errors) > 1e-3, errors
