"""TVLARS under torch's tensor parallelism, on CPU processes (gloo), against one process.

Two spawns: pure tensor parallelism with ``SequenceParallel`` on 2 ranks; on a (dp=2, tp=2) mesh
of 4 ranks, FSDP2 + TP with a module outside the TP plan, TP + DDP, fp16 with
``ShardedGradScaler`` and the meshes TVLARS refuses. The workers assert exactness (see
``tp_workers.TOLERANCE``) and their negative controls; these tests check what they measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp
from dist_workers import free_port
from tp_workers import STEPS, TOLERANCE, mesh_2d_worker, sequence_parallel_worker

pytestmark = [pytest.mark.distributed]

ALL_REDUCE = "c10d.allreduce_"


#: The collectives a step takes beyond TVLARS's: LAMB's global gradient clip needs the
#: gradients' norm before the moments.
CLIP = {"tvlars": 0, "lamb-clip": 1}
EACH = pytest.mark.parametrize("optimizer", list(CLIP))


def _spawn(worker: object, nprocs: int, out: Path, optimizer: str) -> dict[str, Any]:
    args = (nprocs, free_port(), str(out), optimizer)
    mp.spawn(worker, args=args, nprocs=nprocs, join=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.timeout(90)
@EACH
def test_sequence_parallel_is_exact_with_one_all_reduce_for_partial_gradients(
    tmp_path: Path, optimizer: str
) -> None:
    result = _spawn(sequence_parallel_worker, 2, tmp_path / "sp.json", optimizer)
    # the case of issue #16: Replicate() LayerNorm parameters with Partial(sum) gradients
    assert result["placements"]["norm.weight"] == "(Replicate(),)"
    assert result["grad_placements"]["norm.weight"] == "(Partial(sum),)"
    assert result["placements"]["head.weight"] == "plain"  # replicated, outside the plan
    assert result["weight_difference"] <= TOLERANCE["rtol"]
    assert result["norm_difference"] <= TOLERANCE["rtol"]
    assert result["replicas_equal"]
    # per step: one all_reduce for the 4 partial gradients, one for all norms
    assert result["collectives"] == [{ALL_REDUCE: 2 + CLIP[optimizer]}] * STEPS
    # partial gradients taken as local tensors: far off, and the replicas drift apart
    assert result["negative_control"]["weight_difference"] > 1e-2
    assert not result["negative_control"]["replicas_equal"]
    # 3 Partial gradients packed into one all_reduce; a Shard gradient of a Replicate
    # parameter goes through DTensor (one all-gather)
    assert result["local_gradients_collectives"] == {
        ALL_REDUCE: 1,
        "c10d_functional.all_gather_into_tensor": 1,
    }


@pytest.mark.timeout(150)
@EACH
def test_2d_mesh_fsdp2_tp_sub_mesh_tp_ddp_fp16_and_refusals(tmp_path: Path, optimizer: str) -> None:
    result = _spawn(mesh_2d_worker, 4, tmp_path / "2d.json", optimizer)
    clip = CLIP[optimizer]

    fsdp = result["fsdp2_tp"]
    assert fsdp["placements"]["head.weight"] == ["(Shard(dim=0),)", "('dp',)"]  # sub-mesh
    assert fsdp["placements"]["up.weight"][1] == "('dp', 'tp')"
    assert fsdp["weight_difference"] <= TOLERANCE["rtol"]
    assert fsdp["norm_difference"] <= TOLERANCE["rtol"]
    assert fsdp["replicas_equal"]
    assert fsdp["collectives"] == [{ALL_REDUCE: 1 + clip}] * STEPS
    # the head's two copies (one per tp rank) both counted: its norms sqrt(2) too large (LAMB's
    # clip counts them twice too, which changes its update directions: further off)
    counted_twice = fsdp["negative_control"]["norm_difference"]
    if optimizer == "tvlars":
        assert counted_twice == pytest.approx(2**0.5 - 1)
    else:
        assert counted_twice > 2**0.5 - 1

    sub_mesh = result["tp_sub_mesh"]
    assert sub_mesh["weight_difference"] <= TOLERANCE["rtol"]
    assert sub_mesh["replicas_equal"]
    assert sub_mesh["collectives"] == [{ALL_REDUCE: 2 + clip}] * STEPS  # partial grads, norms

    tp_ddp = result["tp_ddp"]
    assert "Spec(" in tp_ddp["placements"]["up.weight"]  # DDP made a local tensor of it
    assert tp_ddp["placements"]["head.weight"] == "plain"
    assert tp_ddp["weight_difference"] <= TOLERANCE["rtol"]
    assert tp_ddp["norm_difference"] <= TOLERANCE["rtol"]
    assert tp_ddp["replicas_equal"]
    assert tp_ddp["collectives"] == [{ALL_REDUCE: 1 + clip}] * STEPS
    assert tp_ddp["negative_control"] > 1e-2

    fp16 = result["fp16"]
    assert fp16["optimizer_steps"] == [1, 1, 2]  # step 1 skipped by the scaler on every rank
    assert fp16["scales"] == [1024.0, 512.0, 512.0]
    assert fp16["tvlars_skip_on_every_rank"]

    pipeline, not_nested = result["refusals"]
    assert "a 2-D mesh of 2 of the 4 ranks, are not supported" in pipeline
    assert "do not nest" in not_nested
