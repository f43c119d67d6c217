"""Subcommands of the ``lightning-tvlars`` command line, and :class:`TVLARSParser` for your own
LightningCLI: ``LightningCLI(MyModel, MyData, parser_class=TVLARSParser)`` (one-line errors;
see :mod:`lightning_tvlars.cli.parser`). It loads Lightning on first use, so that
``lightning-tvlars --version`` and ``plot`` stay quick."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_tvlars.cli.parser import TVLARSParser

__all__ = ["TVLARSParser"]


def __getattr__(name: str) -> Any:
    if name == "TVLARSParser":
        return importlib.import_module("lightning_tvlars.cli.parser").TVLARSParser
    raise AttributeError(f"module 'lightning_tvlars.cli' has no attribute {name!r}")
