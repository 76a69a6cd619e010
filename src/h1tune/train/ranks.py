"""One run, several processes: which process writes, and how the others learn what it decided.

Under `accelerate launch` or `torchrun` every rank runs the whole of `h1tune train`. The output
directory claim, logs, plots, the resolved config, the final artefacts and the run marker are written
by the main process (global rank 0) only, on a file system all nodes share; the other ranks wait for
its decision where they need it (`on_main`). With one process every helper here is a plain call, so
single-process runs take exactly the path they always did.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from h1tune.errors import H1tuneError

T = TypeVar("T")


def world_size() -> int:
    """Processes in the run, from the launcher's environment (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Global rank 0: the one process that writes run files. Readable before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def _process_group() -> None:
    """Join the launcher's process group through accelerate, which picks the backend the Trainer will
    use (nccl on GPUs, gloo on CPUs); the Trainer's own setup later reuses the group."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        _process_group()
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process only and give its result to every rank.

    If `fn` raises on the main process, every rank raises (the main one its own error, the others an
    H1tuneError quoting it), so no rank waits forever at a collective for a rank that stopped.
    """
    if world_size() == 1:
        return fn()
    import torch.distributed as dist

    _process_group()
    payload: list = [None]
    error: BaseException | None = None
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
            payload[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if error is not None:
        raise error
    if kind == "error":
        raise H1tuneError(f"the main process (rank 0) stopped: {value}")
    return value
