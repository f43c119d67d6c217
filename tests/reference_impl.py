"""An independent, deliberately plain TVLARS written from the paper's equations.

It shares no code with the package: float64, Python floats for every norm, one tensor at a
time. Tests compare the optimizer against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def phase_value(t: int, alpha: float, decay: float, delay: float, floor: float) -> float:
    x = decay * (t - delay)
    return floor if x > 700 else 1.0 / (alpha + math.exp(x)) + floor


class PlainTVLARS:
    """``groups``: dicts with params (tensors), lr, momentum, weight_decay, eta, clip, adapt."""

    def __init__(
        self, groups: list[dict[str, Any]], phase: tuple[float, float, float, float] | None
    ):
        self.groups = groups
        self.phase = phase
        self.t = 0
        self.buffers: dict[int, torch.Tensor] = {}

    def step(self, grads: dict[int, torch.Tensor]) -> None:
        """``grads``: by ``id`` of the parameter; parameters missing from it are skipped."""
        phi = 1.0 if self.phase is None else phase_value(self.t, *self.phase)
        for group in self.groups:
            for w in group["params"]:
                if id(w) not in grads:  # no gradient: not updated, as in torch.optim
                    continue
                g = grads[id(w)].double()
                u = g + group["weight_decay"] * w.double()
                if group["adapt"]:
                    wn = math.sqrt(float((w.double() ** 2).sum()))
                    un = math.sqrt(float((u**2).sum()))
                    if wn > 0 and un > 0:
                        cw, cu = wn, un
                        if group["clip"] is not None:
                            cw, cu = min(wn, group["clip"]), min(un, group["clip"])
                        r = group["eta"] * cw / cu
                    else:
                        r = 1.0
                    u = phi * r * u
                buf = self.buffers.get(id(w), torch.zeros_like(u))
                buf = group["momentum"] * buf + u
                self.buffers[id(w)] = buf
                w.copy_((w.double() - group["lr"] * buf).to(w.dtype))
        self.t += 1
