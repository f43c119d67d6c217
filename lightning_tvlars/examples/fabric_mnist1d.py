"""TVLARS in a Lightning Fabric loop: the MNIST-1D classifier, data parallel, with accumulation.

Run it with ``python -m lightning_tvlars.examples.fabric_mnist1d --devices 2`` (CPU
processes; ``--accelerator cuda`` on GPUs). The learning rate is scaled to the effective batch
(per device x ``fabric.world_size`` x accumulation), the phase is fitted to the run's optimizer
steps, and the monitor's metrics go to Fabric's loggers through ``fabric.log_dict``; draw them
with ``lightning-tvlars plot LOGDIR``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tvlars.distributed import end_process_group_at_exit
from lightning_tvlars.examples.classifier import encoder
from lightning_tvlars.examples.mnist1d import NUM_CLASSES, generate
from lightning_tvlars.fabric import configure_tvlars_fabric
from lightning_tvlars.metrics import tvlars_metrics
from lightning_tvlars.recipe import TVLARSConfig


def train(
    fabric: Fabric,
    steps: int = 60,
    batch_size: int = 128,
    accumulation: int = 1,
    lr: float = 2.0,
    num_samples: int = 4000,
    width: int = 16,
    log_every_n_steps: int = 10,
) -> dict[str, Any]:
    """Train for ``steps`` optimizer steps; return what rank zero saw at the end."""
    fabric.seed_everything(0)
    data = generate(num_samples, seed=42)
    train_set = TensorDataset(torch.from_numpy(data["x"]).unsqueeze(1), torch.from_numpy(data["y"]))
    loader = fabric.setup_dataloaders(
        DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True)
    )
    model = nn.Sequential(encoder(width, blocks=1), nn.Linear(2 * width, NUM_CLASSES))
    optimizer, scheduler = configure_tvlars_fabric(
        fabric,
        model,
        TVLARSConfig(lr=lr),
        total_steps=steps,
        batch_size=batch_size,
        accumulation=accumulation,
    )
    model, optimizer = fabric.setup(model, optimizer)
    step, batches, correct, seen = 0, 0, 0, 0
    while step < steps:
        for x, y in loader:
            batches += 1
            stepping = batches % accumulation == 0
            with fabric.no_backward_sync(model, enabled=not stepping):
                logits = model(x)
                fabric.backward(nn.functional.cross_entropy(logits, y) / accumulation)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if not stepping:
                continue
            optimizer.step()
            scheduler.step()
            if (step + 1) % log_every_n_steps == 0 or step + 1 == steps:
                # every rank: exact gradient norms need a collective under sharding
                metrics = tvlars_metrics(optimizer, scheduler=scheduler, name_filter=r"^1\.")
                fabric.log_dict({**metrics, "train/acc": correct / max(seen, 1)}, step=step)
                correct = seen = 0
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    for logger in fabric.loggers:
        logger.finalize("success")  # writes what the loggers still buffer
    # Destroy the process group when this process exits, once the DDP model is released: a gloo
    # group left to the interpreter's own shutdown can abort the process (docs/faq.md).
    end_process_group_at_exit()
    plan = scheduler.plan
    return {
        "steps": optimizer.step_count,
        "effective_batch_size": plan.effective_batch_size,
        "lr": optimizer.param_groups[0]["lr"],
        "phase_end": float(plan.phase(steps)) if plan.phase is not None else 1.0,
        "world_size": fabric.world_size,
        "log_dir": getattr(fabric.logger, "log_dir", None) if fabric.loggers else None,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``--devices``, ``--strategy``, ``--steps``, ``--batch-size``..."""
    parser = argparse.ArgumentParser(prog="python -m lightning_tvlars.examples.fabric_mnist1d")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128, help="per device")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2.0, help="at batch 256")
    parser.add_argument("--logdir", default="fabric_logs")
    args = parser.parse_args(argv)
    fabric = Fabric(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        loggers=CSVLogger(args.logdir, name="tvlars"),
    )
    result: dict[str, Any] = fabric.launch(
        train,
        steps=args.steps,
        batch_size=args.batch_size,
        accumulation=args.accumulation,
        lr=args.lr,
    )
    if fabric.is_global_zero:
        print(f"logged to {result['log_dir']}: lightning-tvlars plot {result['log_dir']}")
    return result


if __name__ == "__main__":
    main()
