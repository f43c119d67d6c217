"""The recipe: what a run asks for (:class:`TVLARSConfig`), what the run is (:class:`RunFacts`),
and :func:`build`, which turns both into an optimizer and its :class:`~lightning_tvlars.
TVLARSScheduler`. It imports torch only: Lightning (:func:`~lightning_tvlars.configure_tvlars`),
Fabric (:func:`~lightning_tvlars.configure_tvlars_fabric`), the command line and the benchmark are
adapters that describe their run and call :func:`build`.

One config describes any member of the family: ``optimizer`` ``lars`` (TVLARS; LARS with the
phase off) or ``lamb``; the start, a phase (fitted to the run, explicit, or off) and/or a linear
warm-up; then a constant, cosine or polynomial learning rate, or one owned by a scheduler of the
user's (``external``). An option that has no effect with the other choices is refused, not
ignored. A LightningModule that takes ``tvlars: TVLARSConfig`` gets every field as a
LightningCLI flag (``--model.tvlars.optimizer lamb``) and YAML key.

Recipes to copy (each returns a fresh config): :func:`barlow_twins` (lightly's Barlow Twins
recipe with the phase), :func:`barlow_twins_warmup_cosine` (lightly's own, with LARS),
:func:`mlperf_lars` (the MLPerf ResNet-50 LARS reference's schedule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from lightning_tvlars._validation import (
    check_choice,
    check_positive_int,
    check_real,
    check_unit_interval,
)
from lightning_tvlars.optim.base import LayerwiseOptimizer
from lightning_tvlars.optim.groups import GroupOverride, param_groups
from lightning_tvlars.optim.lamb import LAMB
from lightning_tvlars.optim.tvlars import TVLARS
from lightning_tvlars.phase import SigmoidPhase
from lightning_tvlars.schedule import (
    ANNEALING,
    LR_SCHEDULES,
    SCALING_RULES,
    FittedPhase,
    LRSchedule,
    PhaseSpec,
    ScalingRule,
    TVLARSScheduler,
)

Optimizer = Literal["lars", "lamb"]
OPTIMIZERS: tuple[str, ...] = ("lars", "lamb")
PhaseMode = Literal["fitted", "explicit", "off"]
PHASE_MODES: tuple[str, ...] = ("fitted", "explicit", "off")
DelayUnit = Literal["steps", "epochs"]

#: What a run may train: a module, a submodule, or parameter groups of the module.
Parameters = nn.Module | Iterable[dict[str, Any]]


@dataclass(frozen=True)
class RunFacts:
    """The run as its framework describes it (see the adapters).

    Attributes:
        total_steps: optimizer steps of one optimizer over the whole run (None: unknown).
        steps_per_epoch: optimizer steps in each epoch ``0 .. max_epochs - 1`` (empty when the
            epochs have no known length).
        per_device_batch_size, replicas, accumulation: the factors of the effective batch.
    """

    total_steps: int | None
    per_device_batch_size: int
    replicas: int = 1
    accumulation: int = 1
    steps_per_epoch: tuple[int, ...] = ()

    @property
    def effective_batch_size(self) -> int:
        """What one optimizer step averages over: per device x replicas x accumulation."""
        return self.per_device_batch_size * self.replicas * self.accumulation

    def epochs_to_steps(self, epochs: float) -> float:
        """Optimizer steps in the first ``epochs`` epochs (fractions interpolate in the epoch;
        a negative number counts steps of the first epoch backwards)."""
        if not self.steps_per_epoch:
            raise ValueError(
                f"a delay of {epochs!r} epochs needs the number of steps per epoch, but the "
                "training epochs have no known length (streaming data or no epoch limit): give "
                "the delay in steps (phase.delay_unit='steps')"
            )
        per = self.steps_per_epoch
        if epochs < 0:
            return epochs * per[0]
        whole = math.floor(epochs)
        done = sum(per[: min(whole, len(per))]) + max(0, whole - len(per)) * per[-1]
        part = epochs - whole
        return float(done + part * (per[min(whole, len(per) - 1)] if part else 0))


@dataclass
class PhaseConfig:
    """The phase ``phi(t) = 1 / (alpha + exp(decay * (t - delay))) + floor``, as a config says it.

    Attributes:
        mode: ``fitted`` (default): fitted to the run, halfway between ceiling and floor at
            ``half_at`` of the optimizer steps and ``decayed_by_end`` of the way down at the
            end (needs a known run length). ``explicit``: ``decay`` per optimizer step and
            ``delay`` in ``delay_unit`` (any run length). ``off``: phi == 1.
        half_at: fitted: the fraction of the run at which phi is halfway, in [0, 1).
        decayed_by_end: fitted: the fraction of the way from ceiling to floor covered at the
            end of the run, in (0.5, 1).
        decay: explicit: the steepness ``lambda`` per optimizer step, >= 0.
        delay: explicit: the centre of the decay ``d``.
        delay_unit: explicit: ``steps`` or ``epochs`` (converted with the real number of
            optimizer steps per epoch).
        alpha: > 0; the ceiling is ``1 / alpha + floor``.
        floor: >= 0, the value phi decays to.
    """

    mode: PhaseMode = "fitted"
    half_at: float = 0.5
    decayed_by_end: float = 0.99
    decay: float | None = None
    delay: float | None = None
    delay_unit: DelayUnit = "steps"
    alpha: float = 1.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        check_choice("phase.mode", self.mode, PHASE_MODES)
        check_choice("phase.delay_unit", self.delay_unit, ("steps", "epochs"))
        unused = {
            "fitted": {"decay", "delay", "delay_unit"},
            "explicit": {"half_at", "decayed_by_end"},
            "off": {"half_at", "decayed_by_end", "decay", "delay", "delay_unit", "alpha", "floor"},
        }[self.mode]
        refuse_unused(self, unused, f"phase.mode={self.mode!r}", "phase.")
        if self.mode == "explicit" and (self.decay is None or self.delay is None):
            raise ValueError(
                f"phase.mode='explicit' needs phase.decay and phase.delay, got "
                f"decay={self.decay!r}, delay={self.delay!r}"
            )
        self.to_spec(RunFacts(None, 1, steps_per_epoch=(1,)))  # the phase's own checks, once

    def to_spec(self, facts: RunFacts) -> PhaseSpec:
        """The phase for a run: :class:`~lightning_tvlars.schedule.FittedPhase`, a
        :class:`~lightning_tvlars.SigmoidPhase` in steps, or ``None``."""
        try:
            if self.mode == "off":
                return None
            if self.mode == "fitted":
                return FittedPhase(self.half_at, self.decayed_by_end, self.alpha, self.floor)
            delay = check_real("delay", self.delay)
            if self.delay_unit == "epochs":
                delay = facts.epochs_to_steps(delay)
            return SigmoidPhase(self.alpha, self.decay, delay, self.floor)  # type: ignore[arg-type]
        except (ValueError, TypeError) as err:
            if str(err).split("=", 1)[0].isidentifier():  # "name=value is invalid: ..."
                raise type(err)(f"phase.{err}") from None
            raise


@dataclass
class TVLARSConfig:
    """A member of the family and its schedule, one name per option (see the module docstring).

    Attributes:
        optimizer: ``lars`` (:class:`~lightning_tvlars.TVLARS`) or ``lamb``
            (:class:`~lightning_tvlars.LAMB`).
        lr: base learning rate at ``base_batch_size``; the applied rate is scaled with the
            effective batch (per device x data-parallel replicas x accumulation).
        lr_scaling: ``linear``, ``sqrt`` or ``none``.
        base_batch_size: the batch ``lr`` is given for.
        weight_decay: decay of the adapted parameters (>= 0); biases and normalization
            parameters get none.
        momentum: LARS: heavy-ball momentum in [0, 1).
        trust_coefficient: LARS: ``eta`` > 0 of the trust ratio ``eta * ||w|| / ||g + wd * w||``.
        norm_clip: LARS: if set (> 0), both norms of the trust ratio are clamped to it (the
            authors' code).
        nesterov: LARS: Nesterov momentum (timm's ``nlars``).
        betas: LAMB: the moments' coefficients ``(beta1, beta2)``.
        eps: LAMB: added to the root of the second moment (> 0).
        max_grad_norm: LAMB: clip all gradients together by their global norm (None: no clip).
        trust_clip: LAMB: clamp the trust ratio to at most 1 (LAMBC).
        phase: the phase (:class:`PhaseConfig`); ``PhaseConfig(mode="off")`` for none.
        warmup_fraction: a linear warm-up of the learning rate over this fraction of the run.
        lr_schedule: after the warm-up, ``constant``, ``cosine`` or ``polynomial`` to
            ``final_lr_ratio`` x the peak at the end of the run; ``external``: a scheduler of
            yours owns the learning rate (it starts from the batch-scaled rate; TVLARS keeps the
            phase).
        final_lr_ratio: where ``cosine`` and ``polynomial`` end.
        lr_power: the power of ``polynomial`` (MLPerf's LARS schedule: 2).
        total_steps: the run's length in optimizer steps, when the trainer cannot know it (data
            whose length changes between epochs, a time budget you know better); default: what
            the trainer says.
        select: selectors of the parameters to optimize (default: every trainable parameter).
        exclude: selectors of parameters kept out of adaptation (biases and normalization
            parameters are out by default).
        include: selectors of parameters adapted although the default rule excludes them.
        overrides: per-selector ``lr_scale``, ``weight_decay`` and ``adapt``
            (:class:`~lightning_tvlars.GroupOverride`), in order; YAML:
            ``[{match: "head.*", lr_scale: 0.1}]``.
        capturable: keep t, the learning rate and phi(t) as tensors on the parameters' device
            (the optimizer's ``capturable=True``; the scheduler writes the rate in place), so
            that the step can be compiled once for the whole run
            (``torch.compile(optimizer.step, fullgraph=True)``) or captured in a CUDA graph. Off
            by default: an eager step is as fast without it (it adds a few scalar kernels).
        compiled: the optimizer's ``compiled=True``: its update (not Lightning's closure)
            compiled by ``torch.compile(fullgraph=True)`` once, on the first step (implies
            ``capturable``). On one CPU thread: 0.6x the eager TVLARS step's time, after a
            compilation of seconds (Inductor's cache warm) to minutes (cold); off by default.
    """

    optimizer: Optimizer = "lars"
    lr: float = 1.0
    lr_scaling: ScalingRule = "linear"
    base_batch_size: int = 256
    weight_decay: float = 5e-4
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    norm_clip: float | None = None
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    max_grad_norm: float | None = None
    trust_clip: bool = False
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    warmup_fraction: float = 0.0
    lr_schedule: LRSchedule = "constant"
    final_lr_ratio: float = 1e-3
    lr_power: float = 2.0
    total_steps: int | None = None
    select: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    overrides: list[GroupOverride] = field(default_factory=list)
    capturable: bool = False
    compiled: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.phase, dict):
            self.phase = PhaseConfig(**self.phase)
        if not isinstance(self.phase, PhaseConfig):
            raise TypeError(f"phase={self.phase!r} is invalid: expected a PhaseConfig or a dict")
        self.overrides = [GroupOverride(**o) if isinstance(o, dict) else o for o in self.overrides]
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # YAML gives a list
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_scaling", self.lr_scaling, SCALING_RULES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_unit_interval("warmup_fraction", self.warmup_fraction)
        if self.total_steps is not None:
            check_positive_int("total_steps", self.total_steps)
        others = {"lars": {"betas", "eps", "max_grad_norm", "trust_clip"}}.get(
            self.optimizer, {"momentum", "trust_coefficient", "norm_clip", "nesterov"}
        )
        refuse_unused(self, others, f"optimizer={self.optimizer!r}", "")
        if self.lr_schedule not in ANNEALING:
            unused = {"final_lr_ratio", "lr_power"}
            refuse_unused(self, unused, f"lr_schedule={self.lr_schedule!r}", "")
        elif self.lr_schedule == "cosine":
            refuse_unused(self, {"lr_power"}, "lr_schedule='cosine'", "")
        if self.lr_schedule == "external":
            refuse_unused(self, {"warmup_fraction"}, "lr_schedule='external' (yours warms up)", "")
        # The classes' own checks (ranges, types), on a one-element stand-in.
        stand_in = self.optimizer_class([nn.Parameter(torch.zeros(1))], **self.optimizer_options())
        self.scheduler(stand_in, RunFacts(2, self.base_batch_size, steps_per_epoch=(2,)))

    @classmethod
    def from_any(cls, value: object) -> TVLARSConfig:
        """A config from a ``TVLARSConfig``, a mapping (hyper-parameters, YAML) or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"tvlars={value!r} is invalid: expected a TVLARSConfig, a dict or None")

    @property
    def optimizer_class(self) -> type[LayerwiseOptimizer]:
        return LAMB if self.optimizer == "lamb" else TVLARS

    def scheduler(self, optimizer: torch.optim.Optimizer, facts: RunFacts) -> TVLARSScheduler:
        """The schedule this config asks for on the run ``facts`` describes."""
        return TVLARSScheduler(
            optimizer,
            total_steps=facts.total_steps,
            effective_batch_size=facts.effective_batch_size,
            lr_scaling=self.lr_scaling,
            base_batch_size=self.base_batch_size,
            phase=self.phase.to_spec(facts),
            warmup_fraction=self.warmup_fraction,
            lr_schedule=self.lr_schedule,
            final_lr_ratio=self.final_lr_ratio,
            lr_power=self.lr_power,
        )

    def optimizer_options(self) -> dict[str, Any]:
        """The constructor options of the chosen optimizer (but the groups and the phase)."""
        if self.optimizer == "lamb":
            return {
                "lr": self.lr,
                "betas": self.betas,
                "eps": self.eps,
                "weight_decay": self.weight_decay,
                "max_grad_norm": self.max_grad_norm,
                "trust_clip": self.trust_clip,
                "capturable": self.capturable,
                "compiled": self.compiled,
            }
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "trust_coefficient": self.trust_coefficient,
            "norm_clip": self.norm_clip,
            "nesterov": self.nesterov,
            "capturable": self.capturable,
            "compiled": self.compiled,
        }


def refuse_unused(config: Any, unused: set[str], because: str, prefix: str) -> None:
    """Raise for any option in ``unused`` that is set away from its default."""
    for f in fields(config):
        if f.name not in unused:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(config, f.name)
        if value != default:
            raise ValueError(
                f"{prefix}{f.name}={value!r} has no effect with {because}: remove it or change "
                "that choice"
            )


def groups_for(
    module: nn.Module, config: TVLARSConfig, parameters: Parameters | None = None
) -> list[dict[str, Any]]:
    """The family's parameter groups for ``module``, a submodule or explicit groups of its
    parameters, with the config's ``select``, ``exclude``, ``include`` and ``overrides``."""
    owner = parameters if isinstance(parameters, nn.Module) else module
    groups = None if isinstance(parameters, nn.Module) or parameters is None else list(parameters)
    return param_groups(
        owner,
        weight_decay=config.weight_decay,
        select=config.select,
        exclude=config.exclude,
        include=config.include,
        overrides=config.overrides,
        groups=groups,
    )


def build(
    module: nn.Module,
    config: TVLARSConfig,
    facts: RunFacts,
    *,
    parameters: Parameters | None = None,
) -> tuple[LayerwiseOptimizer, TVLARSScheduler]:
    """The optimizer and the scheduler ``config`` asks for, planned for the run ``facts``
    describes (``config.total_steps`` replaces the run's length when set).

    Args:
        module: the model (parameter names and the default groups come from it).
        config: the options.
        facts: the run.
        parameters: what this optimizer trains: ``None`` (every trainable parameter of
            ``module``), a submodule, or parameter groups of ``module``'s parameters.

    Examples:
        >>> import torch
        >>> from lightning_tvlars import TVLARSConfig, RunFacts, build
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
        >>> config = TVLARSConfig(optimizer="lamb", lr=1e-3, warmup_fraction=0.1,
        ...                       lr_schedule="cosine")
        >>> optimizer, scheduler = build(model, config, RunFacts(1000, per_device_batch_size=1024))
        >>> type(optimizer).__name__, scheduler.plan.warmup_steps, scheduler.describe_lr()
        ('LAMB', 100, 'learning rate 0.004 = 0.001 x 1024/256 (linear scaling)')
    """
    if config.total_steps is not None:
        facts = RunFacts(
            config.total_steps,
            facts.per_device_batch_size,
            facts.replicas,
            facts.accumulation,
            facts.steps_per_epoch,
        )
    optimizer = config.optimizer_class(
        groups_for(module, config, parameters), **config.optimizer_options()
    )
    return optimizer, config.scheduler(optimizer, facts)


def describe_plan(scheduler: TVLARSScheduler, facts: RunFacts) -> str:
    """The one-line log of a new schedule: the effective batch, the learning rate, the plan."""
    return (
        f"{type(scheduler.optimizer).__name__}: effective batch size "
        f"{facts.effective_batch_size} = "
        f"{facts.per_device_batch_size} per device x {facts.replicas} data-parallel replica(s) x "
        f"{facts.accumulation} accumulated batch(es); {scheduler.describe_lr()}. "
        f"Plan: {scheduler.describe()}."
    )


# ---------------------------------------------------------------------- strategies


def data_parallel_size(strategy: object) -> int:
    """How many replicas see different data: a Lightning or Fabric strategy's
    ``distributed_sampler_kwargs["num_replicas"]`` (the data-parallel degree, not the world size
    under tensor parallelism); 1 without a distributed strategy."""
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", 1))


def deepspeed_zero_stage(strategy: object) -> int | None:
    """The ZeRO stage of a (Lightning or Fabric) DeepSpeed strategy, None for any other."""
    if type(strategy).__name__ != "DeepSpeedStrategy":
        return None
    config = getattr(strategy, "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_strategy(strategy: object) -> None:
    """Refuse strategies under which the family would be silently wrong: DeepSpeed ZeRO
    (stage >= 1) hands the optimizer flat partitions of all parameters, so layer-wise norms do
    not exist."""
    stage = deepspeed_zero_stage(strategy)
    if stage:
        raise ValueError(
            f"strategy=DeepSpeedStrategy(stage={stage}) is not supported: ZeRO hands the optimizer "
            "flat partitions of all parameters, so TVLARS and LAMB cannot compute layer-wise "
            "norms. Use DeepSpeed with stage=0, FSDP (strategy='fsdp'), FSDP2 "
            "(ModelParallelStrategy) or DDP."
        )


# ---------------------------------------------------------------------- recipes to copy


def barlow_twins() -> TVLARSConfig:
    """lightly's Barlow Twins recipe (``benchmarks/imagenet/resnet50/barlowtwins.py``) with
    TVLARS: ``lr`` 0.2 per 256 samples, weight decay 1.5e-6, biases and normalization parameters
    at 0.0048 / 0.2 of the rate (``"@excluded"``), an online classifier (``online_classifier.*``)
    neither decayed nor adapted; the phase fitted to the run instead of lightly's warm-up."""
    return TVLARSConfig(
        lr=0.2,
        base_batch_size=256,
        weight_decay=1.5e-6,
        overrides=[
            GroupOverride(match="@excluded", lr_scale=0.024),
            GroupOverride(match="online_classifier.*", lr_scale=1.0, weight_decay=0.0, adapt=False),
        ],
    )


def barlow_twins_warmup_cosine(warmup_fraction: float = 0.1) -> TVLARSConfig:
    """lightly's Barlow Twins recipe as lightly runs it: LARS (no phase), a linear warm-up over
    ``warmup_fraction`` of the run (lightly: 10 of 100 epochs), then a cosine to 0.001 x the
    peak (lightly's ``CosineWarmupScheduler``)."""
    config = barlow_twins()
    config.phase = PhaseConfig(mode="off")
    config.warmup_fraction = warmup_fraction
    config.lr_schedule = "cosine"
    config.__post_init__()
    return config


def mlperf_lars(warmup_fraction: float = 0.125) -> TVLARSConfig:
    """The MLPerf ResNet-50 LARS reference's schedule (``lars_util.py`` of mlcommons/training):
    learning rate 10 (batches of 4k to 16k, no scaling), trust coefficient 0.001 (epsilon 0: the
    family's trust ratio has none), momentum 0.9, weight decay 5e-5, biases and batch-norm
    parameters neither adapted nor decayed, a linear warm-up (5 epochs of about 40: 0.125 of the
    run), then ``(lr - end) * (1 - p)^2 + end`` to ``end = 1e-4``, i.e. ``final_lr_ratio`` 1e-5;
    no phase. The rules list no compliant PyTorch LARS; this is the reference's formula."""
    return TVLARSConfig(
        lr=10.0,
        lr_scaling="none",
        weight_decay=5e-5,
        momentum=0.9,
        trust_coefficient=1e-3,
        phase=PhaseConfig(mode="off"),
        warmup_fraction=warmup_fraction,
        lr_schedule="polynomial",
        lr_power=2.0,
        final_lr_ratio=1e-5,
    )


# Lightning resumes with torch.load(weights_only=True) by default: allow the config in hparams.
torch.serialization.add_safe_globals([TVLARSConfig, PhaseConfig, GroupOverride])
