"""Benchmarks: accuracy (``lightning-tvlars bench``) and optimizer step speed (``bench-step``)."""
