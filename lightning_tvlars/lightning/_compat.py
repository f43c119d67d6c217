"""Both Lightning packages: ``lightning.pytorch`` and the standalone ``pytorch_lightning``.

lightly's examples (and many older projects) use ``pytorch_lightning``; its classes are
copies, not subclasses, of ``lightning.pytorch``'s, so every ``isinstance`` check against a
Lightning class has to accept either. Callbacks are duck-typed by both trainers.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import lightning.pytorch
    import pytorch_lightning

    #: A LightningModule of either package (for annotations).
    AnyLightningModule: TypeAlias = (
        lightning.pytorch.LightningModule | pytorch_lightning.LightningModule
    )

PACKAGES = ("lightning.pytorch", "pytorch_lightning")


@functools.cache
def lightning_classes(path: str) -> tuple[type, ...]:
    """``path`` (e.g. ``"callbacks.GradientAccumulationScheduler"``) from each installed package."""
    module_path, _, name = path.rpartition(".")
    found = []
    for package in PACKAGES:
        try:
            module = importlib.import_module(f"{package}.{module_path}" if module_path else package)
        except ImportError:
            continue
        found.append(getattr(module, name))
    return tuple(found)
