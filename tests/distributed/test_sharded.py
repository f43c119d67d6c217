"""Exact layer-wise norms under sharding: FSDP2, HSDP, FSDP1 and DDP on CPU processes (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from dist_workers import ddp_count_worker, free_port, fsdp1_worker, fsdp2_worker

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

#: The optimizers of the family under test, and the collectives a sharded step takes beyond
#: TVLARS's one: LAMB's global gradient clip needs the gradients' norm before the moments.
FAMILY = {"tvlars": 0, "lamb": 0, "lamb-clip": 1}
EACH = pytest.mark.parametrize("optimizer", ["tvlars", "lamb-clip"])


def _spawn(worker: object, nprocs: int, *args: object) -> None:
    mp.spawn(worker, args=(nprocs, free_port(), *args), nprocs=nprocs, join=True)


@pytest.mark.parametrize("optimizer", list(FAMILY))
def test_fsdp2_matches_unsharded_training_with_one_collective_per_step(
    tmp_path: Path, optimizer: str
) -> None:
    out = str(tmp_path / "fsdp2.json")
    _spawn(fsdp2_worker, 2, (2,), out, optimizer)
    result = json.loads(Path(out).read_text())
    assert result["collectives"] == [1 + FAMILY[optimizer]] * 4
    assert all(p == "(Shard(dim=0),)" for p in result["placements"])
    assert result["compiled_refused"]  # compiled=True names the eager step instead
    sizes = json.loads(Path(out + ".sizes1").read_text())
    assert 0 in sizes  # rank 1 holds empty shards (Linear(3, 1)): handled exactly


@EACH
def test_hsdp_replicate_shard_mesh_is_exact(tmp_path: Path, optimizer: str) -> None:
    out = str(tmp_path / "hsdp.json")
    _spawn(fsdp2_worker, 4, (2, 2), out, optimizer)
    result = json.loads(Path(out).read_text())
    assert result["collectives"] == [1 + FAMILY[optimizer]] * 4
    assert all(p == "(Replicate(), Shard(dim=0))" for p in result["placements"])


@EACH
def test_fsdp1_orig_params_matches_unsharded_training(tmp_path: Path, optimizer: str) -> None:
    out = str(tmp_path / "fsdp1.json")
    _spawn(fsdp1_worker, 2, True, out, optimizer)
    result = json.loads(Path(out).read_text())
    assert result["collectives"] == [1 + FAMILY[optimizer]] * 4
    # groups built from the wrapped module use the user's names, and 1-D flat views of weights
    # are still adapted (decided by module type, not by ndim)
    assert result["names"] == ["0.weight", "3.weight", "5.weight"]


def test_fsdp1_flat_parameters_are_refused(tmp_path: Path) -> None:
    out = str(tmp_path / "flat.json")
    _spawn(fsdp1_worker, 2, False, out, "tvlars")
    assert json.loads(Path(out).read_text()) == {"refused": True}


@EACH
def test_ddp_needs_no_collective_in_the_step(tmp_path: Path, optimizer: str) -> None:
    out = str(tmp_path / "ddp.json")
    _spawn(ddp_count_worker, 2, out, optimizer)
    assert json.loads(Path(out).read_text())["collectives"] == [0, 0, 0, 0]
