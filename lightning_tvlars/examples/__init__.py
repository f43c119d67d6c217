"""Runnable examples and the embedded workloads (MNIST-1D)."""
