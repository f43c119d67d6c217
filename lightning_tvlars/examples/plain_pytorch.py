"""TVLARS in a plain PyTorch loop, without Lightning.

Run it with ``python -m lightning_tvlars.examples.plain_pytorch``.

Fits a small MLP to a synthetic classification task with a large batch and no warm-up, and
prints the loss, the phase phi(t) and the median trust ratio every few steps.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_tvlars import TVLARS, SigmoidPhase, param_groups


def main(steps: int = 200, batch_size: int = 4096, seed: int = 0) -> float:
    """Train and return the final training accuracy."""
    torch.manual_seed(seed)
    x = torch.randn(batch_size * 4, 32)
    y = (x[:, :8].sum(1) > 0).long() + 2 * (x[:, 8:16].sum(1) > 0).long()  # 4 classes
    model = nn.Sequential(nn.Linear(32, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 4))
    phase = SigmoidPhase.from_training_length(steps)
    optimizer = TVLARS(param_groups(model, weight_decay=5e-4), lr=4.0, phase=phase)

    for step in range(steps):
        index = torch.randint(0, len(x), (batch_size,))
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 40 == 0 or step == steps - 1:
            stats = optimizer.last_step_stats
            assert stats is not None
            ratio = stats.trust_ratio[torch.tensor(stats.adapted)].median().item()
            print(
                f"step {step:4d}  loss {loss.item():.4f}  phi {stats.phase:.3f}  "
                f"trust ratio {ratio:.2e}"
            )

    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"training accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
