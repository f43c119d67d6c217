"""Independent, deliberately plain TVLARS and LAMB written from the papers' equations.

They share no code with the package: float64, Python floats for every norm, one tensor at a
time, per-parameter state in dicts. Tests compare the optimizers against them.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def phase_value(t: int, alpha: float, decay: float, delay: float, floor: float) -> float:
    x = decay * (t - delay)
    return floor if x > 700 else 1.0 / (alpha + math.exp(x)) + floor


def _norm(x: torch.Tensor) -> float:
    return math.sqrt(float((x.detach().double() ** 2).sum()))


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


class PlainTVLARS:
    """``groups``: dicts with params (tensors), lr, momentum, weight_decay, eta, clip, adapt and
    optionally nesterov and maximize."""

    def __init__(
        self, groups: list[dict[str, Any]], phase: tuple[float, float, float, float] | None
    ):
        self.groups = groups
        self.phase = phase
        self.t = 0
        self.buffers: dict[int, torch.Tensor] = {}

    def step(self, grads: dict[int, torch.Tensor]) -> None:
        """``grads``: by ``id`` of the parameter; parameters missing from it are skipped. A step
        whose update holds inf/nan changes nothing (t still advances)."""
        phi = 1.0 if self.phase is None else phase_value(self.t, *self.phase)
        self.t += 1
        new: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        for group in self.groups:
            for w in group["params"]:
                if id(w) not in grads:  # no gradient: not updated, as in torch.optim
                    continue
                g = grads[id(w)].double()
                if group.get("maximize", False):
                    g = -g
                u = g + group["weight_decay"] * w.double()
                if not _finite(u):
                    return
                if group["adapt"]:
                    wn, un = _norm(w), _norm(u)
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
                step = u + group["momentum"] * buf if group.get("nesterov", False) else buf
                new.append(
                    (w, buf if group["momentum"] != 0 else None, w.double() - group["lr"] * step)
                )
        for w, buf, value in new:
            if buf is not None:
                self.buffers[id(w)] = buf
            w.copy_(value.to(w.dtype))


class PlainLAMB:
    """``groups``: dicts with params, lr, beta1, beta2, eps, weight_decay, adapt,
    bias_correction, grad_averaging, trust_clip, decoupled, maximize; ``max_grad_norm`` clips
    all gradients together by their global norm."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        phase: tuple[float, float, float, float] | None,
        max_grad_norm: float | None,
    ):
        self.groups = groups
        self.phase = phase
        self.max_grad_norm = max_grad_norm
        self.t = 0
        self.state: dict[int, dict[str, Any]] = {}

    def step(self, grads: dict[int, torch.Tensor]) -> None:
        phi = 1.0 if self.phase is None else phase_value(self.t, *self.phase)
        self.t += 1
        clip = 1.0
        if self.max_grad_norm is not None:
            total = math.sqrt(sum(_norm(g) ** 2 for g in grads.values()))
            clip = max(1.0, total / self.max_grad_norm)
        new = []
        for group in self.groups:
            b1, b2, eps, wd, lr = (
                group[k] for k in ("beta1", "beta2", "eps", "weight_decay", "lr")
            )
            for w in group["params"]:
                if id(w) not in grads:
                    continue
                g = grads[id(w)].double() / clip
                if group["maximize"]:
                    g = -g
                state = self.state.get(
                    id(w), {"m": torch.zeros_like(g), "v": torch.zeros_like(g), "k": 0}
                )
                k = state["k"] + 1
                m = b1 * state["m"] + ((1 - b1) if group["grad_averaging"] else 1.0) * g
                v = b2 * state["v"] + (1 - b2) * g * g
                mh, vh = (m / (1 - b1**k), v / (1 - b2**k)) if group["bias_correction"] else (m, v)
                d = mh / (vh.sqrt() + eps)
                base = w.double()
                if wd != 0 and group["decoupled"]:
                    base = base * (1 - lr * wd)
                elif wd != 0:
                    d = d + wd * base
                if not _finite(d):
                    return
                if group["adapt"]:
                    wn, dn = _norm(base), _norm(d)
                    r = wn / dn if wn > 0 and dn > 0 else 1.0
                    if group["trust_clip"]:
                        r = min(r, 1.0)
                    d = phi * r * d
                new.append((w, {"m": m, "v": v, "k": k}, base - lr * d))
        for w, state, value in new:
            self.state[id(w)] = state
            w.copy_(value.to(w.dtype))
