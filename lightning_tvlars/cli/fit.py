"""``TVLARSCLI``: a LightningCLI with TVLARS's monitor, a model choice and plain error messages.

``lightning-tvlars fit`` trains the MNIST-1D classifier with TVLARS (no warm-up) and the
monitor; ``--model BarlowTwins1D`` (or any LightningModule, by class name or import path)
trains another model on the same data. Every option is a flag and a YAML key::

    lightning-tvlars fit --model.tvlars.lr 2.0 --model.tvlars.lr_scaling sqrt \
        --data.batch_size 1024 --trainer.max_epochs 5 --monitor.per_layer false
    lightning-tvlars fit --model BarlowTwins1D --model.tvlars.lr 0.5
    lightning-tvlars fit --print_config > my.yaml && lightning-tvlars fit --config my.yaml

A wrong value is reported in one line naming the flag, the value and what is allowed; a run
ends with where its logs and checkpoints are and how to look at them.

Your own module gets the same ``--model.tvlars.*`` flags from any LightningCLI when it takes a
``tvlars: TVLARSConfig`` argument, and the same one-line errors with
``LightningCLI(MyModel, MyData, parser_class=TVLARSParser)``
(:mod:`lightning_tvlars.cli.parser`); :class:`TVLARSCLI` adds ``--monitor.*`` and defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import textwrap
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentParser, DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_tvlars.cli.parser import TVLARSParser
from lightning_tvlars.lightning.monitor import TVLARSMonitor
from lightning_tvlars.lightning.teardown import EndProcessGroupAtExit

#: The models of the ``lightning-tvlars fit --model NAME`` choice, by class name.
MODELS = {
    "MNIST1DClassifier": "lightning_tvlars.examples.classifier.MNIST1DClassifier",
    "BarlowTwins1D": "lightning_tvlars.examples.barlow_twins.BarlowTwins1D",
    "GAN1D": "lightning_tvlars.examples.gan.GAN1D",
}
DEFAULT_MODEL = "MNIST1DClassifier"


class CommandListFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help formatter, keeping the line breaks of the command list (epilog).

    At module level: ``ddp_spawn`` pickles the CLI, its parser and this class with it, into
    each process, and a class defined inside a function cannot be pickled.
    """


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


class ModelChoiceParser(TVLARSParser):
    """:class:`~lightning_tvlars.cli.parser.TVLARSParser` (one-line errors); in model-choice
    mode ``--help`` also lists the default model's options (jsonargparse shows only
    ``--model.help`` for a choice of class) and a wrong ``--model`` names the choices."""

    model_help_class: type | None = None

    def format_help(self, *args: Any, **kwargs: Any) -> str:
        text = super().format_help(*args, **kwargs)
        if self.model_help_class is None:
            return text
        return text + "\n" + model_options_help(self.model_help_class)

    def one_line_error(self, message: str) -> str:
        keys = re.findall(r'Parser key "([^"]+)"', message)
        if "Expected a dot import path string" in message and keys == ["model"]:
            given = re.findall(r"Given value: (.*)", message) or re.findall(
                r"Expected a dot import path string: (.*)", message
            )
            return (
                f"--model={given[-1].strip() if given else '?'} is invalid: expected one of "
                f"{', '.join(MODELS)} or the import path of a LightningModule"
            )
        return super().one_line_error(message)


def model_options_help(model_class: type) -> str:
    """The ``--model.*`` options of ``model_class``, as ``--help`` shows them."""
    parser = ArgumentParser(prog="", add_help=False)
    parser.add_class_arguments(model_class, "model", fail_untyped=False, sub_configs=True)
    body = parser.format_help().split("\n\n", 1)[-1]  # without the usage lines
    others = ", ".join(name for name in MODELS if name != model_class.__name__)
    header = textwrap.fill(
        f"Options of the default model, {model_class.__name__} (--model chooses another: "
        f"{others} or any LightningModule import path; its options: --model.help NAME):",
        width=79,
    )
    return f"{header}\n\n{body}"


class TVLARSCLI(LightningCLI):
    """LightningCLI with ``TVLARSMonitor`` as ``--monitor.*`` and TVLARS-friendly defaults.

    Optimizer flags come from the module's ``tvlars`` argument, never from LightningCLI's
    ``--optimizer``, which would rebuild the optimizer on ``model.parameters()`` and lose the
    parameter groups (``auto_configure_optimizers=False``).

    Args:
        model_class: the module; ``None`` with ``default_model`` lets ``--model`` choose any
            LightningModule (class name or import path), ``default_model`` when not given.
        datamodule_class: the data.
        default_model: the import path of the default model when ``--model`` chooses.
        **kwargs: LightningCLI's arguments.
    """

    def __init__(
        self,
        model_class: type[pl.LightningModule] | None = None,
        datamodule_class: type[pl.LightningDataModule] | None = None,
        default_model: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.default_model = default_model
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # one-line errors (TVLARSParser), and the default model's options in --help
        kwargs.setdefault("parser_class", ModelChoiceParser)
        if default_model is not None:
            kwargs.setdefault("subclass_mode_model", True)
        trainer_defaults = {
            "max_epochs": 5,
            "log_every_n_steps": 10,
            **kwargs.pop("trainer_defaults", {}),
        }
        super().__init__(
            model_class,
            datamodule_class,
            trainer_defaults=trainer_defaults,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TVLARSMonitor, "monitor")
        if self.default_model is not None:
            parser.set_defaults({"model": {"class_path": self.default_model}})
            if isinstance(parser, ModelChoiceParser):
                parser.model_help_class = _import(self.default_model)

    # ------------------------------------------------------------------ the run

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not trainer.loggers:  # the monitor would refuse the run; nothing to log to
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, TVLARSMonitor)]  # type: ignore[attr-defined]
            rank_zero_info("TVLARSMonitor is off: the trainer has no logger (--trainer.logger).")
        EndProcessGroupAtExit.register(trainer)  # any --model: ddp/ddp_spawn processes exit cleanly
        trainer.callbacks.append(RunSummary())  # type: ignore[attr-defined]
        return trainer


class RunSummary(pl.Callback):
    """At the end of a fit, rank zero prints where the run's logs and checkpoints are and how
    to look at them (:func:`run_summary`).

    A callback rather than :meth:`LightningCLI.after_fit`: under ``ddp_spawn`` the launching
    process gets back neither the logger version the workers wrote to (its own logger picks
    the next free one) nor what the monitor logged; the process that trained knows both.
    """

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print(run_summary(trainer), flush=True)


def _short(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else os.fspath(path)


def run_summary(trainer: pl.Trainer) -> str:
    """The last validation metrics of a finished run, where its logs and checkpoints are, and
    the commands to look at them."""
    lines = []
    validation = {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith("val/") and getattr(value, "numel", lambda: 1)() == 1
    }
    if validation:
        lines.append(
            "Last validation: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(validation.items()))
        )
    logs = [(lg, str(lg.log_dir)) for lg in trainer.loggers if getattr(lg, "log_dir", None)]
    for logger, log_dir in logs:
        lines.append(f"Logs ({type(logger).__name__.removesuffix('Logger')}): {_short(log_dir)}")
    checkpoint = trainer.checkpoint_callback
    dirpath = getattr(checkpoint, "dirpath", None)
    if dirpath and os.path.isdir(dirpath):  # fast_dev_run and the like write none
        best = getattr(checkpoint, "best_model_path", "") or getattr(
            checkpoint, "last_model_path", ""
        )
        lines.append(
            f"Checkpoints: {_short(dirpath)}"
            + (f" (best: {os.path.basename(best)})" if best else "")
        )
    monitors = [c for c in trainer.callbacks if isinstance(c, TVLARSMonitor)]  # type: ignore[attr-defined]
    looks = []
    if logs and any(m.logged_steps for m in monitors):
        looks.append(f"  lightning-tvlars plot {_short(logs[0][1])}")
    elif monitors:
        every = getattr(trainer, "log_every_n_steps", "?")
        lines.append(
            "No TVLARS metrics were logged: the run took fewer optimizer steps than "
            f"--trainer.log_every_n_steps={every}."
        )
    looks += [
        f"  tensorboard --logdir {_short(logger.root_dir)}"
        for logger, _ in logs
        if isinstance(logger, TensorBoardLogger)
    ]
    if looks:
        lines += ["Look at the run:", *looks]
    if not lines:
        lines.append("The run had no logger and no checkpoint: nothing was written.")
    return "\n".join(lines)


def fit_main(args: list[str] | None, parser_kwargs: dict[str, Any] | None = None) -> TVLARSCLI:
    """``lightning-tvlars fit|validate|test|predict ...`` (``None``: read ``sys.argv``).

    ``parser_kwargs`` go to the main parser (the command's description and epilog).
    """
    from lightning_tvlars.examples.mnist1d import MNIST1DDataModule

    for path in MODELS.values():  # known by class name to --model
        _import(path)
    return TVLARSCLI(
        None,
        MNIST1DDataModule,
        default_model=MODELS[DEFAULT_MODEL],
        parser_kwargs={"prog": "lightning-tvlars", **(parser_kwargs or {})},
        args=args,
    )
