"""Subcommands of the ``lightning-tvlars`` command line."""
