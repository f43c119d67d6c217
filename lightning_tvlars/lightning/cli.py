"""The ``lightning-tvlars`` command: a LightningCLI with TVLARS, its monitor and MNIST-1D.

``lightning-tvlars fit`` trains the MNIST-1D classifier with TVLARS (no warm-up) and the
monitor. Every option is a flag and a YAML key::

    lightning-tvlars fit --model.tvlars.lr 2.0 --model.tvlars.scaling sqrt \
        --data.batch_size 1024 --trainer.max_epochs 5 --monitor.per_layer false
    lightning-tvlars fit --print_config > my.yaml && lightning-tvlars fit --config my.yaml

``lightning-tvlars bench ...`` runs the accuracy benchmark (see ``lightning_tvlars.bench``).

Your own module gets the same flags from any LightningCLI when it takes a
``tvlars: TVLARSConfig`` argument; use :class:`TVLARSCLI` to also get ``--monitor.*``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_tvlars.lightning.monitor import TVLARSMonitor

#: Subcommands handled outside LightningCLI, mapped to "module:function".
EXTRA_COMMANDS = {
    "bench": "lightning_tvlars.bench.accuracy:main",
    "bench-step": "lightning_tvlars.bench.step:main",
    "bench-monitor": "lightning_tvlars.bench.monitor:main",
    "plot": "lightning_tvlars.cli.plot:main",
}


class TVLARSCLI(LightningCLI):
    """LightningCLI with ``TVLARSMonitor`` as ``--monitor.*`` and TVLARS-friendly defaults.

    Optimizer flags come from the module's ``tvlars`` argument, never from LightningCLI's
    ``--optimizer``, which would rebuild the optimizer on ``model.parameters()`` and lose the
    parameter groups (``auto_configure_optimizers=False``).
    """

    def __init__(
        self,
        model_class: type[pl.LightningModule] | None = None,
        datamodule_class: type[pl.LightningDataModule] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        trainer_defaults = {
            "max_epochs": 5,
            "log_every_n_steps": 10,
            **kwargs.pop("trainer_defaults", {}),
        }
        super().__init__(model_class, datamodule_class, trainer_defaults=trainer_defaults, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TVLARSMonitor, "monitor")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-tvlars``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        import importlib

        module, function = EXTRA_COMMANDS[args[0]].split(":")
        getattr(importlib.import_module(module), function)(args[1:])
        return
    from lightning_tvlars.examples.classifier import MNIST1DClassifier
    from lightning_tvlars.examples.mnist1d import MNIST1DDataModule

    # From the console, LightningCLI reads sys.argv itself (passing it again makes it warn).
    TVLARSCLI(MNIST1DClassifier, MNIST1DDataModule, args=None if argv is None else args)


if __name__ == "__main__":
    main()
