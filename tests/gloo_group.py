"""A real two-process gloo group for tests: `run(fn, tmp_path)` calls fn(rank, tmp_path) in two spawned
processes that share a process group, the CPU substitute for NCCL workers. fn must be importable (a
module-level function); what the ranks need to compare they write under tmp_path."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, tmp_path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, tmp_path)
        # Neither rank tears the group down while the other still uses it: a rank whose peer closed the
        # connection mid-collective aborts ("terminate called without an active exception", seen once on a
        # loaded 2-core machine).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(fn, tmp_path) -> None:
    mp.spawn(_entry, args=(fn, _free_port(), tmp_path), nprocs=WORLD, join=True)
