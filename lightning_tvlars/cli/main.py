"""The ``lightning-tvlars`` command: LightningCLI's ``fit``/``validate``/``test``/``predict``
(:mod:`lightning_tvlars.cli.fit`) and the project's own commands, each with its own ``--help``.

Known noise of a first run (Lightning's cloud tips, a tensorboardX fallback notice, a torch
deprecation raised inside Lightning) is silenced here, for this command only; the library
itself never changes warning or logging settings.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

#: Commands handled outside LightningCLI: name -> ("module:function", one-line description).
EXTRA_COMMANDS = {
    "bench": ("lightning_tvlars.bench.accuracy:main", "accuracy benchmark: TVLARS vs baselines"),
    "compare": (
        "lightning_tvlars.compare.cli:main",
        "does TVLARS help on my model? the benchmark's protocol on any LightningModule",
    ),
    "bench-step": ("lightning_tvlars.bench.step:main", "optimizer step speed"),
    "bench-monitor": ("lightning_tvlars.bench.monitor:main", "training cost of TVLARSMonitor"),
    "plot": ("lightning_tvlars.cli.plot:main", "draw a run's TVLARS metrics to a PNG: plot LOGDIR"),
}

#: LightningCLI's subcommands (:mod:`lightning_tvlars.cli.fit`).
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

#: Warnings of a first run that say nothing about the user's run (message regex).
NOISE_WARNINGS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # fallback to CSVLogger
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch, raised inside Lightning
)
#: Log records of Lightning that advertise services, not the run.
NOISE_LOG_PREFIXES = ("💡 Tip:",)


def _epilog() -> str:
    lines = ["other commands (each has its own --help; --version prints the version):"]
    lines += [f"  {name:<15} {about}" for name, (_, about) in EXTRA_COMMANDS.items()]
    lines += [
        "",
        "fit trains MNIST1DClassifier on MNIST-1D; --model BarlowTwins1D (or GAN1D, or a",
        "LightningModule's import path) trains another model; lightning-tvlars fit --help.",
    ]
    return "\n".join(lines)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE_LOG_PREFIXES)


def silence_known_noise() -> None:
    """Filter the first-run noise listed above (for this process: the command line only)."""
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    # Lightning logs through whichever of these modules was imported last (pytorch_lightning's
    # when lightly is imported): filter them all.
    for package in (
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "lightning_fabric",
    ):
        name = f"{package}.utilities.rank_zero"
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-tvlars``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--version"], ["-V"]):
        from lightning_tvlars import __version__

        print(f"lightning-tvlars {__version__}")
        return
    if args and args[0] in EXTRA_COMMANDS:
        module, function = EXTRA_COMMANDS[args[0]][0].split(":")
        getattr(importlib.import_module(module), function)(args[1:])
        return
    if args and not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
        commands = ", ".join([*LIGHTNING_COMMANDS, *EXTRA_COMMANDS])
        sys.stderr.write(
            f"lightning-tvlars: error: {args[0]!r} is not a command: expected one of {commands} "
            "(see lightning-tvlars --help)\n"
        )
        raise SystemExit(2)
    silence_known_noise()
    from lightning_tvlars.cli import fit

    if not args:
        args = ["--help"]  # the commands, rather than "expected a subcommand"
    # From the console, LightningCLI reads sys.argv itself (passing it again makes it warn).
    fit.fit_main(
        None if argv is None and sys.argv[1:] == args else args,
        parser_kwargs={"epilog": _epilog(), "formatter_class": fit.CommandListFormatter},
    )


if __name__ == "__main__":
    main()
