"""``TVLARSMixin``: TVLARS in a LightningModule with no code.

Inherit it before ``LightningModule`` (from ``lightning.pytorch`` or the standalone
``pytorch_lightning``) and take a ``tvlars`` argument::

    class Classifier(TVLARSMixin, L.LightningModule):
        def __init__(self, tvlars: TVLARSConfig | None = None):
            super().__init__()
            self.save_hyperparameters()

(With ``tvlars: TVLARSConfig = DEFAULT``, a module-level ``TVLARSConfig()``, LightningCLI's
``--help`` and ``--print_config`` show every field; with ``| None = None``, ``--help`` shows
them with ``LightningCLI(..., parser_class=TVLARSParser)`` from :mod:`lightning_tvlars.cli`,
which also reports a bad value in one line.)

``save_hyperparameters`` validates ``tvlars`` (a ``TVLARSConfig`` or a mapping) when the
module is built; ``configure_optimizers`` then calls :func:`~lightning_tvlars.configure_tvlars`
with ``hparams["tvlars"]``, ``configure_callbacks`` adds
:class:`~lightning_tvlars.lightning.sync.ScheduleSync`, and ``lr`` exposes the base learning
rate to Lightning's LR finder (``Tuner.lr_find``), in base-batch units. A class that puts
``LightningModule`` before the mixin (whose ``configure_optimizers`` would then never run) is
refused when it is defined; one that forgot ``LightningModule`` is told so when it is built.
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lightning_tvlars.lightning._compat import lightning_classes
from lightning_tvlars.lightning.configure import configure_tvlars
from lightning_tvlars.lightning.sync import ScheduleSync
from lightning_tvlars.recipe import TVLARSConfig
from lightning_tvlars.schedule import Plan, TVLARSScheduler

_LIGHTNING_MODULES = {
    ("lightning.pytorch", "LightningModule"),
    ("pytorch_lightning", "LightningModule"),
}


def _is_lightning_module_class(klass: type) -> bool:
    """``LightningModule`` itself, of either package (checked without importing either)."""
    package = klass.__module__.split(".core", 1)[0]
    return (package, klass.__name__) in _LIGHTNING_MODULES


def _not_a_module_error(instance: object) -> TypeError:
    return TypeError(
        f"{type(instance).__name__} uses TVLARSMixin but is not a LightningModule: inherit "
        "TVLARSMixin first, then lightning.pytorch.LightningModule (or "
        "pytorch_lightning.LightningModule), e.g. class Model(TVLARSMixin, LightningModule)"
    )


class TVLARSMixin:
    """Give a LightningModule TVLARS with no code (see the module docstring)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        module = next((i for i, k in enumerate(mro) if _is_lightning_module_class(k)), None)
        if module is not None and module < mro.index(TVLARSMixin):
            raise TypeError(
                f"class {cls.__name__} inherits {mro[module].__module__}.LightningModule before "
                "TVLARSMixin, so LightningModule's empty configure_optimizers would hide the "
                f"mixin's: write class {cls.__name__}(TVLARSMixin, LightningModule)"
            )

    def save_hyperparameters(
        self,
        *args: Any,
        ignore: Sequence[str] | str | None = None,
        frame: types.FrameType | None = None,
        logger: bool = True,
    ) -> None:
        """Lightning's ``save_hyperparameters``, then validate ``hparams["tvlars"]`` now.

        A mapping (YAML, a dict) is checked as a ``TVLARSConfig`` here, not at ``fit``; a
        ``TVLARSConfig`` is copied, so a default instance in a signature is never shared.
        """
        if not isinstance(self, lightning_classes("LightningModule")):
            raise _not_a_module_error(self)
        if frame is None:
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        super().save_hyperparameters(  # type: ignore[misc]
            *args, ignore=ignore, frame=frame, logger=logger
        )
        hparams = self.hparams  # type: ignore[attr-defined]
        if "tvlars" in hparams:
            config = TVLARSConfig.from_any(hparams["tvlars"])  # raises for bad values
            if isinstance(hparams["tvlars"], TVLARSConfig):
                hparams["tvlars"] = copy.deepcopy(config)

    @property
    def tvlars_config(self) -> TVLARSConfig:
        """The config from ``hparams["tvlars"]`` (a ``TVLARSConfig`` or a mapping)."""
        return TVLARSConfig.from_any(getattr(self, "hparams", {}).get("tvlars"))

    @property
    def tvlars_schedulers(self) -> list[TVLARSScheduler]:
        """The TVLARS schedulers of the current fit (one per TVLARS optimizer)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return [
            c.scheduler
            for c in trainer.lr_scheduler_configs
            if isinstance(c.scheduler, TVLARSScheduler)
        ]

    @property
    def tvlars_plan(self) -> Plan | None:
        """The plan in effect for the first TVLARS optimizer (run length, scale, phase)."""
        schedulers = self.tvlars_schedulers
        return schedulers[0].plan if schedulers else None

    @property
    def lr(self) -> float:
        """The base learning rate (at ``base_batch_size``), as Lightning's LR finder sees it."""
        return self.tvlars_config.lr

    @lr.setter
    def lr(self, value: float) -> None:
        """Take an applied learning rate (an LR finder's suggestion at this run's effective
        batch), convert it to base-batch units with the schedule's batch factor, and store it
        in ``hparams["tvlars"]``."""
        schedulers = self.tvlars_schedulers
        base = schedulers[0].base_lr_for(value) if schedulers else value
        self.hparams["tvlars"] = replace(self.tvlars_config, lr=base)  # type: ignore[attr-defined]
        for scheduler in schedulers:
            scheduler.set_base_lr(base)

    def configure_optimizers(self) -> Any:
        if not isinstance(self, lightning_classes("LightningModule")):
            raise _not_a_module_error(self)
        return configure_tvlars(self, self.tvlars_config)  # type: ignore[arg-type]

    def configure_callbacks(self) -> Any:
        callbacks = list(super().configure_callbacks())  # type: ignore[misc]
        return [*callbacks, ScheduleSync()]
