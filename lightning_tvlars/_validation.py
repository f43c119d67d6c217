"""Argument checks shared by the public API.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong type) whose message names the
argument, the value it got and what is allowed, e.g. ``lr=-1.0 is invalid: expected a finite
number > 0``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Callable, Iterable
from typing import Any, NoReturn


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: expected {allowed}")


def check_real(name: str, value: Any) -> float:
    """``value`` must be a finite real number (bools are refused); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name}={value!r} is invalid: expected a real number, got {type(value).__name__}"
        )
    if not math.isfinite(value):
        raise _fail(name, value, "a finite number")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` must be finite and > 0."""
    if check_real(name, value) <= 0:
        raise _fail(name, value, "a finite number > 0")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    """``value`` must be finite and >= 0."""
    if check_real(name, value) < 0:
        raise _fail(name, value, "a finite number >= 0")
    return float(value)


def check_unit_interval(name: str, value: Any) -> float:
    """``value`` must lie in [0, 1)."""
    if not 0 <= check_real(name, value) < 1:
        raise _fail(name, value, "a number in [0, 1)")
    return float(value)


def check_open_interval(name: str, value: Any, low: float, high: float) -> float:
    """``value`` must lie strictly between ``low`` and ``high``."""
    if not low < check_real(name, value) < high:
        raise _fail(name, value, f"a number in ({low:g}, {high:g})")
    return float(value)


def _check_int(name: str, value: Any, minimum: int, allowed: str) -> int:
    """``value`` must be an int >= ``minimum`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} is invalid: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise _fail(name, value, allowed)
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    """``value`` must be an int >= 0 (bools are refused)."""
    return _check_int(name, value, 0, "an int >= 0")


def check_positive_int(name: str, value: Any) -> int:
    """``value`` must be an int > 0 (bools are refused)."""
    return _check_int(name, value, 1, "an int > 0")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return str(value)


# ------------------------------------------------------------------ command-line arguments
# argparse prints "argument --repeats: 0 is invalid: expected an integer >= 1".


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line (``prog: error: argument
    --repeats: 0 is invalid: ...``, exit code 2), without the usage lines above it, as the
    LightningCLI commands' errors are; ``--help`` shows the usage."""

    def error(self, message: str) -> NoReturn:
        """End the command with ``message`` in one line (exit code 2)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_argument(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is invalid: expected an integer >= {minimum}")
        return value

    return parse


def non_negative_float_argument(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is invalid: expected a finite number >= 0")
    return value


def device_argument(text: str) -> str:
    """An argparse ``type``: a torch device string (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text} is invalid: expected a torch device such as cpu, cuda or cuda:1"
        ) from None
    return text


def missing_bench_modules(needs: Iterable[tuple[str, str]], subject: str = "") -> str | None:
    """None when the module of every ``(what, module)`` pair imports; else what the benchmark
    commands say: ``"<subject>a, b need timm: pip install 'lightning-tvlars[bench]'"``."""
    missing: dict[str, list[str]] = {}
    for what, module in needs:
        if importlib.util.find_spec(module) is None:
            missing.setdefault(module, []).append(what)
    if not missing:
        return None
    parts = []
    for module, names in missing.items():
        verb = "need" if subject or len(names) > 1 else "needs"  # "the arms x need", "x needs"
        parts.append(f"{subject}{', '.join(names)} {verb} {module}")
    return "; ".join(parts) + ": pip install 'lightning-tvlars[bench]'"
