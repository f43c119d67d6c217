"""Regenerate the figures of the docs: ``python docs/scripts/make_figures.py``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lightning_tvlars import SigmoidPhase

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def phase_figure(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for phase in (
        SigmoidPhase(alpha=1.0, decay=5e-3, delay=1000),
        SigmoidPhase(alpha=1.0, decay=2e-2, delay=1000),
        SigmoidPhase(alpha=2.0, decay=5e-3, delay=1000, floor=0.1),
        SigmoidPhase.from_milestones(half_step=500, end_step=2500),
        SigmoidPhase.reference(decay=1e-3),
    ):
        phase.plot(3000, ax=ax)
    ax.set_ylim(0, 1.6)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("phi(t) = 1 / (alpha + exp(decay (t - delay))) + floor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    ASSETS.mkdir(exist_ok=True)
    phase_figure(ASSETS / "phase.png")
