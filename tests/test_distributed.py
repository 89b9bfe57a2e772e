"""Collectives go through ioisray/distributed.py, which puts tensors where the backend wants them:
CUDA for NCCL (Ray Train's backend whenever workers have GPUs), CPU for gloo."""
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import gloo_group
from ioisray import distributed

PACKAGE = Path(__file__).resolve().parent.parent / "ioisray"
COLLECTIVE = re.compile(r"\b(dist|distributed|torch\.distributed)\.(all_reduce|all_gather\w*|broadcast\w*|barrier|"
                        r"reduce\w*|gather\w*|scatter\w*|all_to_all\w*|send|recv|isend|irecv)\s*\(")


def test_no_module_but_the_collectives_module_calls_a_collective():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py" and path.parent == PACKAGE:
            continue
        text = path.read_text()
        # recipes/process_group.py makes the rendezvous store the process group starts from (no collective:
        # the scan below still applies to it).
        imports_ok = path.relative_to(PACKAGE).as_posix() == "recipes/process_group.py"
        if not imports_ok and re.search(r"^\s*(import torch\.distributed|from torch\.distributed|"
                                        r"from torch import distributed)", text, re.M):
            offenders.append(f"{path.relative_to(PACKAGE)}: imports torch.distributed")
        offenders += [f"{path.relative_to(PACKAGE)}: {m.group(0)}" for m in COLLECTIVE.finditer(text)
                      if not m.group(0).startswith("distributed.")]
    assert offenders == []


def test_the_scan_catches_a_direct_call():
    assert COLLECTIVE.search("    dist.all_reduce(firsts, op=dist.ReduceOp.MIN)")
    assert COLLECTIVE.search("torch.distributed.barrier()")


@pytest.fixture
def fake_group(monkeypatch):
    """A process group of 2 workers whose backend the test chooses (no CUDA here): records every copy
    `distributed.py` makes (destination, non_blocking) and where each reduction happens."""
    seen = {"reduced": [], "copies": []}

    class RecordCopies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to:
                device = torch.device(args[1] if len(args) > 1 else kwargs["device"])
                seen["copies"].append((device, kwargs.get("non_blocking", False)))
                with torch._C.DisableTorchFunction():
                    out = args[0].clone()  # keep the data; remember where it was sent
                out.placed_on = device
                return out
            return func(*args, **kwargs)

    def use(backend):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
        monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

        def all_reduce(t, op=None):
            seen["reduced"].append((getattr(t, "placed_on", t.device), op))
            t.mul_(2)  # as if the other worker held the same values

        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        return seen, RecordCopies()

    return use


def test_nccl_gets_cuda_tensors_and_the_caller_gets_its_own_device_back(fake_group):
    seen, recording = fake_group("nccl")
    counts = torch.tensor([1.0, 2.0], dtype=torch.float64)  # CPU counters, as the tally keeps them
    with recording:
        out = distributed.all_reduce_sum(counts)
    assert seen["reduced"] == [(torch.device("cuda", 0), dist.ReduceOp.SUM)]
    # There without waiting (ordered on the GPU's stream), back waiting: the caller reads it at once.
    assert seen["copies"] == [(torch.device("cuda", 0), True), (torch.device("cpu"), False)]
    assert out.tolist() == [2.0, 4.0]
    with recording:
        distributed.all_reduce_min(torch.tensor([3.0]))
        distributed.barrier()
    assert [d for d, _ in seen["reduced"]] == [torch.device("cuda", 0)] * 3
    assert seen["reduced"][1][1] == dist.ReduceOp.MIN


def test_gloo_gets_cpu_tensors_in_place(fake_group):
    seen, recording = fake_group("gloo")
    counts = torch.tensor([1.0, 2.0])
    with recording:
        out = distributed.all_reduce_sum(counts)
    assert seen["reduced"] == [(torch.device("cpu"), dist.ReduceOp.SUM)] and seen["copies"] == []
    assert out.tolist() == [2.0, 4.0]


def _collectives(rank, tmp_path):
    assert distributed.is_distributed() and distributed.world_size() == 2
    assert distributed.group_device() == torch.device("cpu")
    counts = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
    total = distributed.all_reduce_sum(counts)
    low = distributed.all_reduce_min(torch.tensor([5.0 - rank, float("inf") if rank else 2.0]))
    distributed.barrier()
    assert total.dtype == torch.float64 and total.tolist() == [3.0, 10.0]
    assert low.tolist() == [4.0, 2.0]


def test_every_collective_on_a_real_two_process_gloo_group(tmp_path):
    gloo_group.run(_collectives, tmp_path)


def test_outside_a_process_group_collectives_return_their_input():
    t = torch.tensor([1.0, 5.0])
    assert distributed.all_reduce_sum(t) is t and distributed.all_reduce_min(t) is t
    distributed.barrier()
    assert distributed.world_size() == 1 and distributed.group_device() == torch.device("cpu")
