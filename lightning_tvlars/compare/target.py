"""The user's LightningModule, LightningDataModule and Trainer settings, built fresh per run.

:class:`Target` holds the ``model``, ``data`` and ``trainer`` sections of the command line as
LightningCLI's parser reads them (class paths, init arguments, YAML), as JSON: it pickles into
worker processes and names the setup of a CSV (:attr:`Target.fingerprint`). Each run builds
new instances from it (:meth:`Target.build`), with the cell's batch size as the ``batch_size``
init argument of the data (or of the model, without ``--data``), and a Trainer with the user's
settings (precision, strategy, devices, accumulation, clipping, callbacks, ...) except what
the comparison owns: the budget (:data:`Budget`), no logger, checkpoint, progress bar, model
summary or sanity check.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

#: How long every run trains: ``("epochs", n)`` or ``("steps", n)`` (optimizer steps).
Budget = tuple[Literal["epochs", "steps"], int]

#: Trainer settings every run of a comparison gets (runs write no logs and no checkpoints; the
#: rows and the report are the output).
TRAINER_OVERRIDES: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


@functools.cache
def lightning_parser() -> LightningArgumentParser:
    """``--model``, ``--data`` and ``--trainer.*`` as LightningCLI declares them."""
    parser = LightningArgumentParser(exit_on_error=False)
    add_lightning_arguments(parser)
    return parser


def add_lightning_arguments(parser: LightningArgumentParser) -> None:
    """Any LightningModule (required) and LightningDataModule (optional) by class path, and
    the Trainer's arguments (callbacks and loggers by class path too)."""
    parser.add_lightning_class_args(pl.LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(
        pl.LightningDataModule, "data", subclass_mode=True, required=False
    )
    parser.add_lightning_class_args(pl.Trainer, "trainer")


def import_class(path: str) -> type:
    """The class at the import path ``path`` (``package.module.Class``)."""
    module, _, name = path.rpartition(".")
    cls: type = getattr(__import__(module, fromlist=[name]), name)
    return cls


def takes(cls: type, argument: str) -> bool:
    """Whether ``cls(...)`` takes ``argument`` by name."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return argument in parameters


@dataclass(frozen=True)
class Target:
    """What ``compare`` trains (see the module docstring).

    Attributes:
        config: the ``model``, ``data`` and ``trainer`` sections as JSON (class paths and
            init arguments; the trainer's budget already set).
        batch_size_owner: ``data`` or ``model``, the section whose ``batch_size`` init
            argument each cell sets; ``None``: the loaders keep their own batch size.
        budget: the training budget of every run.
    """

    config: str
    batch_size_owner: Literal["data", "model"] | None
    budget: Budget

    @property
    def sections(self) -> dict[str, Any]:
        sections: dict[str, Any] = json.loads(self.config)
        return sections

    @property
    def model_class(self) -> str:
        """The LightningModule's import path."""
        return str(self.sections["model"]["class_path"])

    @property
    def data_class(self) -> str | None:
        """The LightningDataModule's import path (``None``: the module's own loaders)."""
        data = self.sections.get("data")
        return str(data["class_path"]) if data else None

    @property
    def task(self) -> str:
        """The ``task`` of the rows: the model's class name."""
        return self.model_class.rpartition(".")[2]

    def default_batch_size(self) -> int | None:
        """The ``batch_size`` init argument as configured, when there is one."""
        if self.batch_size_owner is None:
            return None
        value = (self.sections[self.batch_size_owner].get("init_args") or {}).get("batch_size")
        return value if isinstance(value, int) else None

    @property
    def fingerprint(self) -> str:
        """12 hex digits naming the model, data and trainer settings, without the batch size
        (each cell sets its own): the rows of a CSV must all share it."""
        sections = self.sections
        if self.batch_size_owner is not None:
            (sections[self.batch_size_owner].get("init_args") or {}).pop("batch_size", None)
        text = json.dumps([sections, list(self.budget)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def build(
        self, batch_size: int | None = None
    ) -> tuple[pl.LightningModule, pl.LightningDataModule | None, dict[str, Any]]:
        """New instances: the module, the data module (``None`` without ``--data``) and the
        Trainer's keyword arguments (with :data:`TRAINER_OVERRIDES`), the cell's
        ``batch_size`` set where :attr:`batch_size_owner` takes it."""
        sections = self.sections
        if batch_size is not None and self.batch_size_owner is not None:
            owner = sections[self.batch_size_owner]
            owner["init_args"] = {**(owner.get("init_args") or {}), "batch_size": batch_size}
        parser = lightning_parser()
        cfg = parser.parse_object(sections)
        init = parser.instantiate_classes(cfg)
        trainer = init["trainer"]
        kwargs = dict(trainer.as_dict() if isinstance(trainer, Namespace) else trainer)
        kwargs["callbacks"] = list(trainer.get("callbacks") or [])
        kwargs.update(TRAINER_OVERRIDES)
        return init["model"], init.get("data"), kwargs
