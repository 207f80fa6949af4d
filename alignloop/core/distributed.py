"""Which process am I? One place that starts Accelerate's process state, so every stage agrees.

On a machine without CUDA the state is created with `cpu=True`: launched by `accelerate launch --multi_gpu
--num_processes N` (torchrun under the hood), the processes then join one gloo group on the CPU. Accelerate
1.15's `--cpu` launcher starts a single process unless MPI is installed (`--mpirun_hostfile`), so the
two-process CPU runs in the tests and the README use `--multi_gpu`.
"""

from __future__ import annotations


def state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return state().is_main_process


def broadcast(value):
    """The main process's `value`, on every process."""
    current = state()
    if current.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box)
    return box[0]


def finish(*, ok: bool) -> None:
    """Leave the process group cleanly before the process exits. A rank that finished its share (a non-main
    rank skips saving and registering) first waits for the others (`ok`), then every rank destroys the group:
    a rank that exits with the gloo group alive can die in its destructor (SIGABRT, "terminate called without
    an active exception"), failing a run that succeeded (Gloo's worker threads outlive the interpreter's
    teardown: pytorch/pytorch#179291; seen once in CI on `rl train`'s rank 1). After an error there is no
    barrier (the other ranks may never reach it)."""
    import sys

    if "torch.distributed" not in sys.modules:  # nothing started a group (and torch need not be loaded)
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()
