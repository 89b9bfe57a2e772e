import os

import pytest
import torch

# The end-to-end files that each start Ray several times, slowest first: run first (with
# `--dist loadfile` each goes to whichever of the two test processes is free), so that the many
# short files fill the gaps instead of one long file ending the run alone.
SLOW_FIRST = ["test_job.py", "test_tune_cli.py", "test_cluster.py", "test_gpu_acceptance.py"]


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept


@pytest.fixture(scope="session", autouse=True)
def torch_threads_per_test_process():
    """With the suite in several processes (pytest-xdist), each takes its share of the cores as torch
    threads: OpenMP threads oversubscribed by the other process and its Ray runs made a 4 s test take 70 s."""
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    yield


@pytest.fixture
def one_torch_thread():
    # On 2 cores shared with other work, oversubscribed OpenMP threads make small convs ~20x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray for the tests of one module (4 logical CPUs, 128 MB object store)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": a new Ray, never another one running on this host (a concurrent test's)
    ray.init(address="local", num_cpus=4, object_store_memory=128 * 2**20, include_dashboard=False,
             logging_level="ERROR",
             # as recipes/launch.ray_session: idle workers are kept (the prestart test relies on it)
             _system_config={"idle_worker_killing_time_threshold_ms": 60_000, "num_workers_soft_limit": 64})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
