"""``python -m lightning_tvlars.cli ...`` is ``lightning-tvlars ...``."""

from lightning_tvlars.cli.main import main

main()
