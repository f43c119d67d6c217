"""Layer-wise L2 norms of weights and updates, accumulated in float32 (float64 for float64).

The optimizer hands over the *local* tensors it updates (for a DTensor parameter its local
shard) and gets back one float32 vector of norms per list, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float32, or float64 when any tensor is float64: norms never accumulate in 16 bits."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def local_norms(tensors: Sequence[Tensor], *, foreach: bool) -> Tensor:
    """``||x||_2`` of every tensor as one vector (one kernel pass with ``foreach``)."""
    dtype = accumulation_dtype(tensors)
    if foreach:
        return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=dtype))
    return torch.stack([torch.linalg.vector_norm(x, 2, dtype=dtype) for x in tensors])


def layerwise_norms(
    weights: Sequence[Tensor], updates: Sequence[Tensor], *, foreach: bool
) -> tuple[Tensor, Tensor]:
    """``(||w_i||, ||u_i||)`` for every tensor pair, as two vectors.

    Both lists go through one norm pass, so the foreach path launches one multi-tensor kernel.
    """
    norms = local_norms([*weights, *updates], foreach=foreach)
    weight_norm, update_norm = norms.split(len(weights))
    return weight_norm, update_norm
