"""``EndProcessGroupAtExit``: after a successful fit, destroy the process group at process exit.

Lightning leaves a gloo process group alive until the interpreter finalizes (it destroys only
NCCL groups at exit), and a process that exits so can abort with "terminate called without an
active exception" (:mod:`lightning_tvlars.distributed` explains why). The ``ddp_spawn`` workers
exit right after the fit; ``ddp`` processes at the end of the script. This callback destroys the
group when the process exits, after the fit succeeded and the DDP wrapper was released, which
joins gloo's threads while Python still runs. :func:`~lightning_tvlars.configure_tvlars` adds it
to the trainer if it is missing; ``lightning-tvlars fit`` adds it for any model.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch.distributed as dist

from lightning_tvlars.distributed import end_process_group_at_exit, keep_process_group_at_exit


class EndProcessGroupAtExit(pl.Callback):
    """Destroys the process group at exit once a fit has succeeded (see the module docstring)."""

    @classmethod
    def register(cls, trainer: pl.Trainer) -> EndProcessGroupAtExit:
        """The trainer's ``EndProcessGroupAtExit``, added if missing."""
        callback = next((c for c in trainer.callbacks if isinstance(c, cls)), None)  # type: ignore[attr-defined]
        if callback is None:
            callback = cls()
            trainer.callbacks.append(callback)  # type: ignore[attr-defined]
        return callback

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if dist.is_available() and dist.is_initialized():
            end_process_group_at_exit()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        keep_process_group_at_exit()  # exit at once: the group may have collectives in flight
