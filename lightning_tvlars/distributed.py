"""Leave ``torch.distributed`` before the interpreter exits: destroy the process groups.

A process that exits with a gloo process group alive can abort after its work is done
("terminate called without an active exception", SIGABRT). The collectives issued during a
backward pass (DDP's gradient all-reduce) carry torch's thread-local state, which holds Python's
``contextvars`` context (``torch.autograd.graph._engine_run_backward`` stashes it there), so the
gloo worker thread that drops the last reference to a finished collective takes the GIL. Once the
interpreter is finalizing, a thread that takes the GIL is ended with ``pthread_exit``, and that
unwinding through the collective's ``noexcept`` destructor calls ``std::terminate``. Nothing in
torch or Lightning destroys a gloo group at exit (Lightning does it for NCCL only).

Destroying the group while Python still runs frees it, and freeing a gloo group joins its worker
threads: none is left to take the GIL at exit. The models wrapped in DDP or FSDP hold the group
too, so it must be destroyed after they are released; the end of the process (``atexit``) is
that point for a whole run. Two holders outlive their users: ``torch.distributed.nn``'s
functions take ``group=group.WORLD`` as a default, evaluated when it is imported (DDP imports it
on first use), which this module imports before any group exists; and DTensor's caches keep
device meshes, and the meshes their groups, for the life of the process (FSDP2, tensor
parallelism). See docs/faq.md.
"""

from __future__ import annotations

import atexit
import gc

import torch.distributed as dist

if dist.is_available():  # see the module docstring: imported before any group exists
    import torch.distributed.nn  # noqa: F401


def end_process_group() -> None:
    """Destroy every process group, if one is initialized (otherwise do nothing).

    Garbage that still holds a group (a DDP wrapper in a reference cycle) is collected first,
    so that destroying the groups frees them and joins gloo's worker threads.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()


def end_process_group_at_exit() -> None:
    """Call :func:`end_process_group` when this process exits (registered once).

    Call it once the run has succeeded, on every rank: after a failure a rank should exit at
    once rather than wait for its group's unfinished collectives.
    """
    atexit.unregister(end_process_group)
    atexit.register(end_process_group)


def keep_process_group_at_exit() -> None:
    """Undo :func:`end_process_group_at_exit` (a failed run exits without waiting on its group)."""
    atexit.unregister(end_process_group)
