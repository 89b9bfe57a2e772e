"""The local Ray a job starts (recipes/launch.ray_session): its address is explicit in every process it
starts, so Ray's helpers never guess among other Ray instances on the host, and it is a loopback-only
Ray: nothing it opens listens beyond 127.0.0.1 (its Prometheus /metrics endpoints would answer anyone
on the network, without Ray's token)."""
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cli_utils import descendants, is_loopback, listeners

from ioisray.config import load_config
from ioisray.recipes.launch import LOCAL_RAY_SYSTEM, RayDidNotStart, ray_session
from ioisray.run import RunInterrupted

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent


STOP_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def _read_slowly():
    import ray

    try:
        for _ in ray.data.range(10_000, override_num_blocks=100).map_batches(_slow).iter_batches(batch_size=1):
            pass
    except Exception:  # noqa: BLE001 - its executor is shut down under it, which is the point
        pass


def _slow(batch):
    time.sleep(0.5)
    return batch


def _data_executors():
    return [t for t in threading.enumerate() if type(t).__name__ == "StreamingExecutor" and t.is_alive()]


@pytest.fixture
def short_tmpdir():
    tmp = tempfile.mkdtemp(prefix="t", dir="/tmp")  # short: Ray's socket paths live under $TMPDIR
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_the_local_ray_has_an_explicit_address_listens_on_loopback_only_and_leaves_no_pymp(monkeypatch, short_tmpdir):
    import ray

    cfg = load_config(ROOT / "configs/digits_ce.yaml", ["ray.local_num_cpus=2"])
    tmp = short_tmpdir
    monkeypatch.setenv("TMPDIR", tmp)
    monkeypatch.setattr(tempfile, "tempdir", tmp)
    for name in STOP_LOGGERS:  # ray_session silences them when a run stops; put back for the next tests
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    with pytest.raises(RunInterrupted), ray_session(cfg):
        address = os.environ["RAY_ADDRESS"]
        gcs = ray.get_runtime_context().gcs_address
        assert address == gcs  # the address every helper of this Ray will use

        @ray.remote(num_cpus=0)
        def seen_by_a_task():
            return os.environ.get("RAY_ADDRESS")

        assert ray.get(seen_by_a_task.remote()) == gcs  # worker processes are told, too
        sockets = listeners(descendants(os.getpid()))
        assert len(sockets) >= 3, f"found too few of this Ray's listening sockets: {sockets}"
        # Nothing beyond loopback: not the GCS, the raylet or the agents, and not the Prometheus
        # /metrics endpoints of the dashboard and the autoscaler monitor (no token asked there).
        for pid, ip, port in sockets:
            process = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120]
            assert is_loopback(ip), f"{ip}:{port} is open to the network ({process})"
        # Ray's dashboard starts its modules from a multiprocessing forkserver, which listens in a
        # pymp-* folder of $TMPDIR ...
        deadline = time.monotonic() + 60
        while not list(Path(tmp).glob("pymp-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(Path(tmp).glob("pymp-*"))
        # A run stopped while Ray Data streams to it (a job's baseline stopped by SIGTERM ends as
        # RunInterrupted): its executor is stopped before Ray shuts down under it, and what Ray's threads
        # log about the shut-down Ray stays out of the console.
        reading = threading.Thread(target=_read_slowly, daemon=True)
        reading.start()
        deadline = time.monotonic() + 60
        while not _data_executors() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _data_executors()
        raise RunInterrupted("run digits_ce interrupted at epoch 1 of 1")
    assert not _data_executors()
    assert all(logging.getLogger(name).level == logging.CRITICAL for name in STOP_LOGGERS)
    assert "RAY_ADDRESS" not in os.environ or os.environ["RAY_ADDRESS"] != address  # restored after the job
    # ... which Ray, ending the dashboard, would leave behind: one per run.
    assert not list(Path(tmp).glob("pymp-*"))


def test_the_local_object_store_is_sized_from_the_data_within_a_floor_and_a_share_of_memory():
    from ioisray.recipes.launch import local_object_store_bytes

    MB, GB = 2**20, 2**30
    plain = load_config(None, ["synthesis.mode=none"])
    assert plain.ray.object_store_mb is None  # sized by default
    assert local_object_store_bytes(plain, 0, system_bytes=24 * GB) == 512 * MB  # the floor
    # HAM10000 at 224 px: 10,015 images, 1.5 GB in the store (training, validation and test splits).
    ham = 10_015 * 224 * 224 * 3
    assert local_object_store_bytes(plain, ham, system_bytes=24 * GB) == 2 * ham
    assert local_object_store_bytes(plain, ham, system_bytes=8 * GB) == int(0.3 * 8 * GB)  # capped
    assert local_object_store_bytes(plain, ham, system_bytes=GB) == 512 * MB  # never below the floor
    iois = load_config(None, ["synthesis.mode=online", "synthesis.budget=2000", "data.image_size=224"])
    assert local_object_store_bytes(iois, ham, system_bytes=24 * GB) == 2 * (ham + 2000 * 224 * 224 * 3)
    # budget=balance is a number once a run has its split; a Ray started before that counts the cap.
    balance = load_config(None, ["synthesis.mode=online", "synthesis.budget=balance", "synthesis.max_budget=2000",
                                 "data.image_size=224"])
    assert local_object_store_bytes(balance, ham, system_bytes=24 * GB) == 2 * (ham + 2000 * 224 * 224 * 3)
    asked = load_config(None, ["ray.object_store_mb=128"])
    assert local_object_store_bytes(asked, ham, system_bytes=24 * GB) == 128 * MB  # as configured


def test_a_local_ray_gets_the_object_store_its_data_needs():
    import ray

    cfg = load_config(ROOT / "configs/digits_ce.yaml", ["ray.local_num_cpus=2"])
    with ray_session(cfg, data_bytes=400 * 2**20):
        assert ray.cluster_resources()["object_store_memory"] == pytest.approx(800 * 2**20, rel=0.01)
    # ray.init adds its session's spilling folder to the system config it is given: not to ioisray's own,
    # which the next Ray of this process would then spill into.
    assert "object_spilling_config" not in LOCAL_RAY_SYSTEM


def test_a_ray_that_does_not_start_in_time_is_stopped_and_said_so():
    import ray

    cfg = load_config(ROOT / "configs/digits_ce.yaml", ["ray.local_num_cpus=2", "ray.start_timeout_s=0.001"])
    before = descendants(os.getpid())
    with pytest.raises(RayDidNotStart, match=r"Ray did not start within 0.001 s \(ray.start_timeout_s\)"):
        with ray_session(cfg):
            pass
    assert not ray.is_initialized()
    deadline = time.monotonic() + 10
    while descendants(os.getpid()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not descendants(os.getpid()) - before  # what it had started (its GCS) is gone
