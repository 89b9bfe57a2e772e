"""The one place that calls `torch.distributed` collectives (plain PyTorch, no Ray).

NCCL only takes CUDA tensors and gloo only CPU ones, and Ray Train picks NCCL whenever its workers
have GPUs (a single worker included). So every collective here moves its tensor to the process
group's device, reduces it there, and hands the result back on the caller's device: callers may
pass CPU counters or CUDA losses alike. Outside a process group (one process, tests, benchmarks)
every function is a no-op on the tensor it was given.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def group_device() -> torch.device:
    """Where the default process group's backend wants tensors: CUDA under NCCL, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Only a copy to a GPU may skip waiting: it is ordered on the device's stream before the collective.
    # A non-blocking copy back to the host returns before the data has landed, and the caller reads it
    # at once (counts, times).
    return t.to(device, non_blocking=device.type != "cpu")


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed() or world_size() == 1:
        return t
    device = group_device()
    if t.device == device:
        dist.all_reduce(t, op=op)
        return t
    on_group = _move(t, device)
    dist.all_reduce(on_group, op=op)
    return _move(on_group, t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the training workers, returned on `t`'s device (a new tensor when it had to move)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum over the training workers, on `t`'s device."""
    return _all_reduce(t, dist.ReduceOp.MIN)


def barrier() -> None:
    """Wait for every worker. A one-element all-reduce on the group's device rather than
    `dist.barrier()`, which under NCCL guesses a device from the rank and can pick the wrong GPU."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(_move(torch.zeros(1), group_device()), op=dist.ReduceOp.SUM)
