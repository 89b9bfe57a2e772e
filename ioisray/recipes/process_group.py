"""Where the torch.distributed process group of a run's Ray Train workers listens.

Ray Train's own set-up (ray.train.torch.config._TorchBackend) lets rank 0's rendezvous store, a
TCPStore, listen on every interface (torch binds it to 0.0.0.0 / :: whatever address it is given), so
a run on the private local Ray, promised to listen on 127.0.0.1 only, answered on the machine's network
address too. Here rank 0 first opens the store's server on a socket bound to its node's Ray address
(127.0.0.1 on the private local Ray, the node's cluster address on a cluster) and keeps it; torch's
rendezvous then finds that server (a TCPStore is "multi-tenant": a second one for the same port in
the same process uses the server already there) instead of starting its own. Gloo's and NCCL's own
sockets follow the host name's address unless told an interface: on a loopback node they are told
the loopback interface.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from typing import Optional

import ray
from ray.train.torch.config import (TorchConfig, _set_torch_distributed_env_vars, _setup_torch_process_group,
                                    _TorchBackend)

# Rank 0's store server (the TCPStore and nothing else): kept for the life of the worker process, as
# torch keeps a multi-tenant server only while a store holds it.
_SERVER: Optional[object] = None


def loopback_interface() -> Optional[str]:
    """The name of the network interface that holds 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    try:
        import psutil  # Ray's own dependency (it ships a copy)

        for name, addresses in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addresses):
                return name
    except ImportError:
        pass
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """On rank 0: the rendezvous store's server, listening on this node's Ray address only, on a port
    the system picks (held from here on, so no other process can take it before the store starts).
    Returns (address, port) for every rank's MASTER_ADDR and MASTER_PORT."""
    global _SERVER
    import torch.distributed as dist

    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # The store owns the socket from here on (it closes it when it stops).
    _SERVER = dist.TCPStore(address, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                            multi_tenant=True, master_listen_fd=sock.detach())
    return address, port


def _set_rendezvous(address: str, port: int) -> None:
    """On every rank: where the store is, and, on a loopback node, gloo's and NCCL's interface (a
    user's own GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME is kept)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    if ipaddress.ip_address(address).is_loopback and (lo := loopback_interface()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)


class _NodeAddressBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        # Ray Train's _TorchBackend.on_start for the "env" rendezvous of gloo or NCCL, with the store
        # served on the node's address (serve_store) instead of on every interface.
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0
                                             else "gloo")
        n = len(worker_group)
        address, port = worker_group.execute_single(0, serve_store, n, backend_config.timeout_s)
        worker_group.execute(_set_rendezvous, address=address, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                                   world_size=n, init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(n)])


class NodeAddressTorchConfig(TorchConfig):
    """Ray Train's TorchConfig whose process group listens on the node's Ray address only (see the
    module's notes)."""

    @property
    def backend_cls(self):
        return _NodeAddressBackend
