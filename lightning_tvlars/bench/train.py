"""One benchmark run: MNIST-1D on one device, a plain training loop, sharpness, evaluation.

The loop indexes tensors that live on the device (no DataLoader), so that many small runs can
share a GPU; on CPU it is the same code. The optimizer and its schedule are the product's recipe
(:func:`~lightning_tvlars.recipe.build`, as :func:`~lightning_tvlars.configure_tvlars` builds them
in a Lightning run: the same parameter groups, :class:`~lightning_tvlars.TVLARSScheduler`, batch
scaling, phase), stepped in the same order (optimizer, then scheduler, once per batch); a test
checks that the weights match a Lightning run on the same batches.

Only torch and torch-only code of this package are needed (lightly for its LARS arm only):
the data comes from the cache (``mnist1d`` is imported only to generate a missing file) and the
Barlow Twins head, loss and augmentation are written here, equal to lightly's and to
:mod:`lightning_tvlars.examples.barlow_twins` (tests compare them), so that a GPU machine
without lightly runs the benchmark.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_tvlars.bench.protocol import (
    ARMS,
    SHARPNESS_FIELDS,
    Arm,
    Preset,
    RunSpec,
    setting_part,
    setting_value,
    spec_columns,
)
from lightning_tvlars.examples.classifier import encoder
from lightning_tvlars.examples.mnist1d import NUM_CLASSES, generate
from lightning_tvlars.recipe import PhaseConfig, RunFacts, TVLARSConfig, build, groups_for
from lightning_tvlars.schedule import TVLARSScheduler
from lightning_tvlars.sharpness import SharpnessReport, measure_sharpness

#: Value of phi at the end of the run for the authors' form ``1 / (0.1 + exp(decay (t + 1)))``.
AUTHORS_FINAL_PHASE = 0.01
#: The authors' clamp of both norms of the trust ratio.
AUTHORS_NORM_CLIP = 10.0


# ------------------------------------------------------------------------------ data


DATA_SEED = 42  # MNIST1DDataModule's default


def dataset(preset: Preset) -> dict[str, np.ndarray]:
    """The preset's MNIST-1D arrays (:func:`~lightning_tvlars.examples.mnist1d.generate`)."""
    return generate(
        preset.num_samples,
        seed=DATA_SEED,
        corr_noise_scale=preset.corr_noise_scale,
        iid_noise_scale=preset.iid_noise_scale,
    )


@dataclass
class DeviceData:
    """MNIST-1D splits as tensors on one device (``x``: ``(n, 1, 40)`` float, ``y``: long)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @classmethod
    def load(cls, preset: Preset, device: torch.device | str) -> DeviceData:
        """The preset's data set (from the cache, generated if missing) on ``device``."""
        data = dataset(preset)
        x = torch.from_numpy(data["x"]).unsqueeze(1)
        y = torch.from_numpy(data["y"])
        val = preset.val_size
        if not 0 < val < len(y):
            raise ValueError(f"val_size={val} is invalid for {len(y)} training samples")
        tensors = (
            x[:-val],
            y[:-val],
            x[-val:],
            y[-val:],
            torch.from_numpy(data["x_test"]).unsqueeze(1),
            torch.from_numpy(data["y_test"]),
        )
        return cls(*(t.to(device) for t in tensors))


_DATA: dict[tuple[Any, ...], DeviceData] = {}


def device_data(preset: Preset, device: torch.device | str) -> DeviceData:
    """:meth:`DeviceData.load`, once per process, data set and device."""
    key = (
        preset.num_samples,
        preset.val_size,
        preset.corr_noise_scale,
        preset.iid_noise_scale,
        str(device),
    )
    if key not in _DATA:
        _DATA[key] = DeviceData.load(preset, device)
    return _DATA[key]


# ------------------------------------------------------------------------------ models


def classifier(width: int, blocks: int) -> nn.Sequential:
    """The examples' 1-D ResNet encoder with a linear head (``MNIST1DClassifier``'s layers)."""
    return nn.Sequential(encoder(width, blocks), nn.Linear(2 * width, NUM_CLASSES))


def projection_head(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    """Barlow Twins' projector, as lightly's ``BarlowTwinsProjectionHead`` builds it."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, output_dim),
    )


def barlow_twins_loss(z_a: Tensor, z_b: Tensor, lambda_param: float = 5e-3) -> Tensor:
    """lightly's ``BarlowTwinsLoss``: cross-correlation of batch-standardized embeddings."""
    z_a = F.batch_norm(z_a, None, None, training=True)
    z_b = F.batch_norm(z_b, None, None, training=True)
    c = z_a.T @ z_b / z_a.shape[0]
    n = c.shape[0]
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].pow(2).sum()
    return on_diagonal + lambda_param * off_diagonal


def augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The random view of :func:`lightning_tvlars.examples.barlow_twins.augment` (without
    lightly): circular shift by up to 4, scaling in [0.8, 1.2], noise 0.1, a masked segment."""
    batch, _, length = x.shape
    device = x.device
    shifts = torch.randint(-4, 5, (batch,), generator=generator, device=device)
    index = (torch.arange(length, device=device) - shifts[:, None]) % length
    x = x.gather(2, index[:, None, :])
    x = x * torch.empty(batch, 1, 1, device=device).uniform_(0.8, 1.2, generator=generator)
    x = x + 0.1 * torch.randn(x.shape, generator=generator, device=device)
    start = torch.randint(0, length, (batch, 1), generator=generator, device=device)
    width = torch.randint(0, 9, (batch, 1), generator=generator, device=device)
    position = torch.arange(length, device=device)[None, :]
    mask = (position >= start) & (position < start + width)
    return x.masked_fill(mask[:, None, :], 0.0)


class BarlowTwinsNet(nn.Module):
    """Encoder and projector of :class:`~lightning_tvlars.examples.barlow_twins.BarlowTwins1D`."""

    def __init__(self, width: int, blocks: int, projection_dim: int) -> None:
        super().__init__()
        self.encoder = encoder(width, blocks)
        self.projection_head = projection_head(2 * width, projection_dim, projection_dim)

    def loss(self, view_a: Tensor, view_b: Tensor) -> Tensor:
        z_a = self.projection_head(self.encoder(view_a))
        z_b = self.projection_head(self.encoder(view_b))
        return barlow_twins_loss(z_a, z_b)


# ------------------------------------------------------------------------------ optimizers


def phase_setting(setting: str, total_steps: int) -> PhaseConfig:
    """The phase of a setting's phase part (``half=f`` or ``authors``).

    ``half=f``: fitted to the run, halfway at ``f`` of it and 99% of the way down at the end;
    ``half=1``: halfway at the end (``half_at=0.99, decayed_by_end=0.51``: phi goes from 0.98
    through 0.88 at mid-run to 0.49); ``authors``: the authors' form
    ``1 / (0.1 + exp(decay (t + 1)))`` with ``decay`` such that phi reaches 0.01 at the end
    (:func:`arm_config` adds their norm clamp at 10).
    """
    part = setting_part(setting, "phase")
    if part == "authors":
        decay = math.log(1 / AUTHORS_FINAL_PHASE - 0.1) / (total_steps + 1)
        return PhaseConfig(mode="explicit", alpha=0.1, delay=-1.0, decay=decay)
    half = None if part is None else setting_value(part)
    if half is None:
        raise ValueError(f"setting {setting!r} is invalid: it has no phase (half=... or authors)")
    return (
        PhaseConfig(half_at=0.99, decayed_by_end=0.51) if half >= 1 else PhaseConfig(half_at=half)
    )


#: What an arm leaves to the model: the parameters and their decay (``arm_config``'s ``base``).
MODEL_FIELDS = ("weight_decay", "base_batch_size", "select", "exclude", "include", "overrides")


def arm_config(
    arm: Arm, spec: RunSpec, total_steps: int, base: TVLARSConfig | None = None
) -> TVLARSConfig:
    """The :class:`~lightning_tvlars.TVLARSConfig` of an arm's run: the product's recipe for
    every arm (lightly's LARS takes the same groups and schedule).

    The setting's parts: ``half=f`` / ``authors`` the phase (``authors`` with the authors' norm
    clamp at 10 for LARS), ``warmup=f`` the warm-up fraction, ``trust=c`` LARS's trust
    coefficient. :data:`MODEL_FIELDS` (weight decay 5e-4, the default groups) come from
    ``base`` when given (a model's own config), the same for every arm.
    """
    setting = spec.setting
    options: dict[str, Any] = {}
    if arm.start in ("phase", "warmup-phase"):
        options["phase"] = phase_setting(setting, total_steps)
        if setting_part(setting, "phase") == "authors" and arm.optimizer == "lars":
            options["norm_clip"] = AUTHORS_NORM_CLIP
    else:
        options["phase"] = PhaseConfig(mode="off")
    if arm.start in ("warmup", "warmup-phase"):
        warmup = setting_value(setting, "warmup")
        if warmup is None:
            raise ValueError(f"setting {setting!r} is invalid for arm {arm.name!r}: no warmup=")
        options["warmup_fraction"] = warmup
    trust = setting_value(setting, "trust")
    if trust is not None:
        options["trust_coefficient"] = trust
    model = {name: getattr(base or TVLARSConfig(weight_decay=5e-4), name) for name in MODEL_FIELDS}
    return TVLARSConfig(
        optimizer="lamb" if arm.optimizer == "lamb" else "lars",
        lr=spec.lr,
        lr_scaling=arm.lr_scaling,  # type: ignore[arg-type]
        lr_schedule=arm.annealing,  # type: ignore[arg-type]
        **model,
        **options,
    )


def optimizer_for(
    model: nn.Module, spec: RunSpec, steps_per_epoch: int, epochs: int
) -> tuple[torch.optim.Optimizer, TVLARSScheduler]:
    """Optimizer and scheduler, as :func:`~lightning_tvlars.configure_tvlars` builds them (the
    same :func:`~lightning_tvlars.recipe.build`; a test checks the weights against a Lightning
    run)."""
    arm = ARMS[spec.arm]
    total = steps_per_epoch * epochs
    facts = RunFacts(total, spec.batch_size, steps_per_epoch=(steps_per_epoch,) * epochs)
    config = arm_config(arm, spec, total)
    if arm.optimizer != "lightly-lars":
        return build(model, config, facts)
    from lightly.utils.lars import LARS

    # lightly adapts exactly the groups with weight decay: the excluded group has none.
    groups = [
        {k: v for k, v in g.items() if k not in ("adapt", "param_names")}
        for g in groups_for(model, config)
    ]
    optimizer = LARS(groups, lr=config.lr, momentum=config.momentum, weight_decay=5e-4)
    return optimizer, config.scheduler(optimizer, facts)


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def accuracy(
    predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, chunk: int = 8192
) -> Tensor:
    """Top-1 accuracy of ``predict`` (logits) over ``x`` in chunks, as a 0-d tensor."""
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        correct += (predict(xs).argmax(1) == ys).sum()
    return correct / len(y)


@torch.no_grad()
def features(net: nn.Module, x: Tensor, chunk: int = 8192) -> Tensor:
    """Encoder features of ``x`` in eval mode."""
    return torch.cat([net(xs) for xs in x.split(chunk)])


def linear_probe(
    train: tuple[Tensor, Tensor], *evaluate: tuple[Tensor, Tensor], iterations: int = 100
) -> list[float]:
    """Logistic regression on frozen features: accuracies on ``train`` then each of ``evaluate``.

    Features are standardized with the training mean and std; the weights minimize the
    cross-entropy plus ``1e-4 / 2 ||W||^2`` by full-batch L-BFGS (strong Wolfe line search,
    ``iterations`` iterations, deterministic).
    """
    x, y = train
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head = nn.Linear(x.shape[1], NUM_CLASSES).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    solver = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe"
    )
    xs = (x - mean) / std

    def closure() -> Tensor:
        solver.zero_grad()
        loss = F.cross_entropy(head(xs), y) + 0.5e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(closure)
    results = [accuracy(head, xs, y)]
    results += [accuracy(head, (xe - mean) / std, ye) for xe, ye in evaluate]
    return [float(r) for r in torch.stack(results).tolist()]


# ------------------------------------------------------------------------------ one run


@functools.cache
def code_version() -> str:
    """The package's git commit (``+dirty`` when its code differs from it), or its version
    outside a git checkout: which optimizer code produced a row."""
    import subprocess

    from lightning_tvlars import __version__

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return __version__
        dirty = git("diff", "--quiet", "HEAD", "--", "lightning_tvlars").returncode != 0
    except (OSError, subprocess.SubprocessError):
        return __version__
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _probe(
    model: nn.Module, loss_fn: Callable[[], Tensor], preset: Preset, step: int
) -> SharpnessReport:
    probe = preset.probe
    return measure_sharpness(
        loss_fn,
        model,
        iterations=probe.iterations,
        trace_samples=probe.trace_samples,
        directions=probe.directions,
        seed=0,
        step=step,
        num_samples=probe.num_samples,
    )


def sharpness_columns(prefix: str, report: SharpnessReport | None) -> dict[str, str]:
    """``{prefix}_{measure}`` CSV cells of :data:`SHARPNESS_FIELDS` (empty when not measured)."""
    values = {name: getattr(report, name, None) for name in SHARPNESS_FIELDS}
    return {
        f"{prefix}_{name}": "" if value is None else f"{value:.6g}"
        for name, value in values.items()
    }


def run(
    spec: RunSpec,
    preset: Preset,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> dict[str, Any]:
    """Train one run and return its CSV row (see :data:`lightning_tvlars.bench.runner.FIELDS`).

    The seed sets the initial weights, the batch order and (Barlow Twins) the augmentations;
    the probe batch (the first ``probe.num_samples`` training samples, and for Barlow Twins
    two fixed views of it) is the same in every run. ``on_step(step, optimizer)`` is called
    after every optimizer step (step counts from 1).
    """
    start = time.perf_counter()
    device = torch.device(device)
    data = device_data(preset, device)
    epochs = preset.epochs[spec.task]
    n_train = len(data.y_train)
    steps_per_epoch = n_train // spec.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {spec.batch_size} exceeds the {n_train} training samples")
    total = steps_per_epoch * epochs
    torch.manual_seed(spec.seed)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    probe_x = data.x_train[: preset.probe.num_samples]
    size = preset.models[spec.task]
    model: nn.Module
    if spec.task != "barlow_twins":
        model = classifier(size.width, size.blocks).to(device)
        probe_y = data.y_train[: preset.probe.num_samples]

        def batch_loss(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(model(x), y)

        def probe_loss() -> Tensor:
            return F.cross_entropy(model(probe_x), probe_y)
    else:
        net = BarlowTwinsNet(size.width, size.blocks, preset.projection_dim).to(device)
        model = net
        views = torch.Generator(device=device).manual_seed(0)
        probe_views = (augment(probe_x, views), augment(probe_x, views))

        def batch_loss(x: Tensor, y: Tensor) -> Tensor:
            return net.loss(augment(x, generator), augment(x, generator))

        def probe_loss() -> Tensor:
            return net.loss(*probe_views)

    optimizer, scheduler = optimizer_for(model, spec, steps_per_epoch, epochs)
    early_step = min(total, round(spec.probe_fraction * total))
    early = _probe(model, probe_loss, preset, 0) if early_step == 0 else None
    probe_seconds = early.seconds if early else 0.0
    step, diverged = 0, False
    epoch_loss = torch.zeros((), device=device)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=generator, device=device)
        epoch_loss = torch.zeros((), device=device)
        for index in order[: steps_per_epoch * spec.batch_size].view(steps_per_epoch, -1):
            loss = batch_loss(data.x_train[index], data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.detach()
            step += 1
            if on_step is not None:
                on_step(step, optimizer)
            if step == early_step:
                early = _probe(model, probe_loss, preset, step)
                probe_seconds += early.seconds
        if not math.isfinite(float(epoch_loss)):  # one host sync per epoch
            diverged = True
            break
    end = _probe(model, probe_loss, preset, step) if not diverged else None
    probe_seconds += end.seconds if end else 0.0
    model.eval()
    if spec.task != "barlow_twins":
        measured = torch.stack(
            [
                accuracy(model, data.x_train, data.y_train),
                accuracy(model, data.x_val, data.y_val),
                accuracy(model, data.x_test, data.y_test),
            ]
        ).tolist()
        train_acc, val_acc, test_acc = (float(v) for v in measured)
    else:
        encode = net.encoder
        train_acc, val_acc, test_acc = linear_probe(
            (features(encode, data.x_train), data.y_train),
            (features(encode, data.x_val), data.y_val),
            (features(encode, data.x_test), data.y_test),
        )
    return {
        **spec_columns(spec),
        "epochs": epochs,
        "steps": step,
        "train_loss": f"{float(epoch_loss) / max(1, steps_per_epoch):.6g}",
        "train_accuracy": f"{train_acc:.5f}",
        "val_accuracy": f"{val_acc:.5f}",
        "test_accuracy": f"{test_acc:.5f}",
        "converged": int(not diverged and train_acc >= preset.converged_train_accuracy[spec.task]),
        "diverged": int(diverged),
        "early_step": early_step,
        **sharpness_columns("early", early),
        **sharpness_columns("end", end),
        "probe_seconds": f"{probe_seconds:.2f}",
        "wall_seconds": f"{time.perf_counter() - start:.2f}",
        "device": device.type,
        "model_params": sum(p.numel() for p in model.parameters()),
        "code_version": code_version(),
    }
