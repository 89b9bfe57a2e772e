import os

import pytest
import torch

# The end-to-end files that each start Ray and Ray Train several times run in one test process, one
# after the other: side by side on 2 cores they took longer than one after the other (the Tune resume: 98 s
# alone, 268 s beside the job test). The other process starts with the cluster test, which mostly waits
# (nodes joining, a job's runtime environment, 60% of 2 cores when alone), and the GPU dry run, then takes
# the short files. xdist hands each process two units at first, in this order: the end-to-end pair and a
# short file to one, the cluster test and the dry run to the other.
END_TO_END = ["test_job.py", "test_tune_cli.py", "test_readme.py"]
FIRST = [*END_TO_END, "test_cluster.py", "test_aas.py", "test_gpu_acceptance.py"]


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (the default in pyproject.toml), with the end-to-end files as one unit. (xdist's
    own `loadgroup` does not group under pytest 9: its group suffix never reaches the node ids.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class EndToEndInOneProcess(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "end_to_end" if file.rsplit("/", 1)[-1] in END_TO_END else file

    return EndToEndInOneProcess(config, log)


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
    """A small local Ray for the tests of one module (4 logical CPUs, 128 MB object store), started as
    `ioisray` starts its own (recipes/launch.ray_session): a new Ray, never another one running on this
    host, whose processes are told its address. Ray Train's placement-group cleaner asks the State API
    whether its run's controller is alive; in a Ray without a dashboard (this fixture's until then) it
    asks the default dashboard port, where another test's Ray may answer that no such actor exists, and
    it then removes the live run's workers (a prestart test failed so, once in the suite)."""
    from ioisray.config import Config
    from ioisray.recipes.launch import ray_session

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with ray_session(Config(ray={"local_num_cpus": 4, "object_store_mb": 128})):
        yield
