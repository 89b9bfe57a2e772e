"""The local Ray a job starts (recipes/launch.ray_session): its address is explicit in every process it
starts, so Ray's helpers never guess among other Ray instances on the host, and it is a loopback-only
Ray: nothing it opens listens beyond 127.0.0.1 (its Prometheus /metrics endpoints would answer anyone
on the network, without Ray's token)."""
import ipaddress
import os
from pathlib import Path

import pytest

from cli_utils import descendants

from ioisray.config import load_config
from ioisray.recipes.launch import ray_session

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent


def _listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state held by one of `pids` (Linux /proc)."""
    inodes: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            # The kernel prints the address as 32-bit words in host (little-endian) order.
            raw = b"".join(int(hex_ip[i:i + 8], 16).to_bytes(4, "little") for i in range(0, len(hex_ip), 8))
            inodes[fields[9]] = (str(ipaddress.ip_address(raw)), int(hex_port, 16))
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.append((*inodes[target[8:-1]], pid))
    return sorted(set(found))


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def test_the_local_ray_has_an_explicit_address_and_listens_on_loopback_only():
    import ray

    cfg = load_config(ROOT / "configs/digits_ce.yaml", ["ray.local_num_cpus=2"])
    with ray_session(cfg):
        address = os.environ["RAY_ADDRESS"]
        gcs = ray.get_runtime_context().gcs_address
        assert address == gcs  # the address every helper of this Ray will use

        @ray.remote(num_cpus=0)
        def seen_by_a_task():
            return os.environ.get("RAY_ADDRESS")

        assert ray.get(seen_by_a_task.remote()) == gcs  # worker processes are told, too
        sockets = _listening_sockets(descendants(os.getpid()))
        assert len(sockets) >= 3, f"found too few of this Ray's listening sockets: {sockets}"
        # Nothing beyond loopback: not the GCS, the raylet or the agents, and not the Prometheus
        # /metrics endpoints of the dashboard and the autoscaler monitor (no token asked there).
        for ip, port, pid in sockets:
            process = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120]
            assert _loopback(ip), f"{ip}:{port} is open to the network ({process})"
    assert "RAY_ADDRESS" not in os.environ or os.environ["RAY_ADDRESS"] != address  # restored after the job


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
