"""Both Lightning packages: ``lightning.pytorch`` and the standalone ``pytorch_lightning``.

lightly's examples (and many older projects) use ``pytorch_lightning``; its classes are
copies, not subclasses, of ``lightning.pytorch``'s, so every ``isinstance`` check against a
Lightning class has to accept either. Callbacks are duck-typed by both trainers.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import lightning.pytorch
    import pytorch_lightning

    #: A LightningModule of either package (for annotations).
    AnyLightningModule: TypeAlias = (
        lightning.pytorch.LightningModule | pytorch_lightning.LightningModule
    )

PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def lightning_classes(path: str) -> tuple[type, ...]:
    """``path`` (e.g. ``"callbacks.GradientAccumulationScheduler"``) from each package in use.

    ``pytorch_lightning`` is only looked at once something imported it: a module or trainer
    of that package implies it, and importing it here would reroute Lightning's rank-zero log
    records to its logger for everybody else.
    """
    loaded = tuple(p for p in PACKAGES if p == PACKAGES[0] or p in sys.modules)
    return _classes(path, loaded)


@functools.cache
def _classes(path: str, packages: tuple[str, ...]) -> tuple[type, ...]:
    module_path, _, name = path.rpartition(".")
    found = []
    for package in packages:
        try:
            module = importlib.import_module(f"{package}.{module_path}" if module_path else package)
        except ImportError:
            continue
        found.append(getattr(module, name))
    return tuple(found)
