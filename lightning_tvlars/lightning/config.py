"""``TVLARSConfig``: the options of TVLARS in a Lightning run, one name per option.

A LightningModule that takes ``tvlars: TVLARSConfig`` in ``__init__`` gets all of these as
LightningCLI flags (``--model.tvlars.lr 2.0``, ``--model.tvlars.phase.mode explicit``) and YAML
keys, and saves them with its hyper-parameters. The names are the optimizer's: ``decay`` and
``delay`` of the phase are :class:`~lightning_tvlars.SigmoidPhase`'s, ``weight_decay``,
``momentum``, ``trust_coefficient``, ``norm_clip`` are :class:`~lightning_tvlars.TVLARS`'s.
An option that has no effect with the other choices made is refused, not ignored.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

import torch

from lightning_tvlars._validation import (
    check_choice,
    check_non_negative,
    check_open_interval,
    check_positive,
    check_positive_int,
    check_real,
    check_unit_interval,
)
from lightning_tvlars.lightning.scaling import SCALING_RULES, ScalingRule
from lightning_tvlars.optim.groups import GroupOverride
from lightning_tvlars.schedule import LR_SCHEDULES, LRSchedule

PhaseMode = Literal["fitted", "explicit", "off"]
PHASE_MODES: tuple[str, ...] = ("fitted", "explicit", "off")
DelayUnit = Literal["steps", "epochs"]


@dataclass
class PhaseConfig:
    """The phase ``phi(t) = 1 / (alpha + exp(decay * (t - delay))) + floor``.

    Attributes:
        mode: ``fitted`` (default): fitted to the run, halfway between ceiling and floor at
            ``half_at`` of the optimizer steps and ``decayed_by_end`` of the way down at the
            end (needs a known run length). ``explicit``: ``decay`` per optimizer step and
            ``delay`` in ``delay_unit`` (any run length, ``max_epochs=-1`` included).
            ``off``: phi == 1, i.e. LARS.
        half_at: fitted: the fraction of the run at which phi is halfway, in [0, 1).
        decayed_by_end: fitted: the fraction of the way from ceiling to floor covered at the
            end of the run, in (0.5, 1).
        decay: explicit: the steepness ``lambda`` per optimizer step, >= 0.
        delay: explicit: the centre of the decay ``d``.
        delay_unit: explicit: ``steps`` or ``epochs`` (converted with the real number of
            optimizer steps per epoch, accumulation schedules included).
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
        # FittedPhase's own checks, with the names of this config
        check_unit_interval("phase.half_at", self.half_at)
        check_open_interval("phase.decayed_by_end", self.decayed_by_end, 0.5, 1.0)
        check_positive("phase.alpha", self.alpha)
        check_non_negative("phase.floor", self.floor)
        if self.decay is not None:
            check_non_negative("phase.decay", self.decay)
        if self.delay is not None:
            check_real("phase.delay", self.delay)
        unused = {
            "fitted": {"decay", "delay", "delay_unit"},
            "explicit": {"half_at", "decayed_by_end"},
            "off": {"half_at", "decayed_by_end", "decay", "delay", "delay_unit", "alpha", "floor"},
        }[self.mode]
        _refuse_unused(self, unused, f"phase.mode={self.mode!r}", "phase.")
        if self.mode == "explicit" and (self.decay is None or self.delay is None):
            raise ValueError(
                f"phase.mode='explicit' needs phase.decay and phase.delay, got "
                f"decay={self.decay!r}, delay={self.delay!r}"
            )


@dataclass
class TVLARSConfig:
    """Options of :func:`~lightning_tvlars.configure_tvlars` and the mixin.

    Attributes:
        lr: base learning rate at ``base_batch_size``; the applied rate is scaled with the
            effective batch (per device x data-parallel replicas x accumulation).
        lr_scaling: ``linear``, ``sqrt`` or ``none``.
        base_batch_size: the batch ``lr`` is given for.
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: decay of adapted parameters (>= 0), folded into the update
            ``g + weight_decay * w``; biases and normalization parameters get none.
        trust_coefficient: ``eta`` > 0 of the trust ratio ``eta * ||w|| / ||g + wd * w||``.
        norm_clip: if set (> 0), both norms of the trust ratio are clamped to it (the authors'
            code).
        phase: the phase (:class:`PhaseConfig`).
        lr_schedule: ``constant`` (TVLARS as in the paper) or ``cosine`` annealing to
            ``final_lr_ratio`` x the initial rate at the end of the run.
        final_lr_ratio: only with ``lr_schedule='cosine'``.
        select: ``fnmatch`` patterns of the parameters to optimize (default: every trainable
            parameter of the module given to ``configure_tvlars``).
        exclude: ``fnmatch`` patterns of parameters kept out of adaptation (biases and
            normalization parameters are out by default).
        include: ``fnmatch`` patterns of parameters adapted although the default rule
            excludes them.
        overrides: per-pattern ``lr_scale``, ``weight_decay`` and ``adapt``
            (:class:`~lightning_tvlars.GroupOverride`), in order; YAML:
            ``[{match: "head.*", lr_scale: 0.1}]``.
    """

    lr: float = 1.0
    lr_scaling: ScalingRule = "linear"
    base_batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trust_coefficient: float = 1e-3
    norm_clip: float | None = None
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    lr_schedule: LRSchedule = "constant"
    final_lr_ratio: float = 1e-3
    select: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    overrides: list[GroupOverride] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.phase, dict):
            self.phase = PhaseConfig(**self.phase)
        if not isinstance(self.phase, PhaseConfig):
            raise TypeError(f"phase={self.phase!r} is invalid: expected a PhaseConfig or a dict")
        self.overrides = [GroupOverride(**o) if isinstance(o, dict) else o for o in self.overrides]
        check_positive("lr", self.lr)
        check_choice("lr_scaling", self.lr_scaling, SCALING_RULES)
        check_positive_int("base_batch_size", self.base_batch_size)
        check_unit_interval("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_positive("trust_coefficient", self.trust_coefficient)
        if self.norm_clip is not None:
            check_positive("norm_clip", self.norm_clip)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_non_negative("final_lr_ratio", self.final_lr_ratio)
        if self.lr_schedule == "constant":
            _refuse_unused(self, {"final_lr_ratio"}, "lr_schedule='constant'", "")

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


def _refuse_unused(config: Any, unused: set[str], because: str, prefix: str) -> None:
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


# Lightning resumes with torch.load(weights_only=True) by default: allow the config in hparams.
torch.serialization.add_safe_globals([TVLARSConfig, PhaseConfig, GroupOverride])
