"""Moved to :mod:`lightning_tvlars.cli`: the command line lives there now.

Kept so that ``from lightning_tvlars.lightning.cli import TVLARSCLI, main`` and
``python -m lightning_tvlars.lightning.cli`` keep working.
"""

from __future__ import annotations

from lightning_tvlars.cli.fit import TVLARSCLI
from lightning_tvlars.cli.main import EXTRA_COMMANDS, main

__all__ = ["EXTRA_COMMANDS", "TVLARSCLI", "main"]

if __name__ == "__main__":
    main()
