"""What the Ray cluster a run uses has, or can scale to, and what a run may ask of it.

A cluster that autoscales (cluster.yaml's GPU node types, `min_workers: 0`) shows no GPU until a request
makes the autoscaler add a node, so requests are compared with what the cluster can scale to: its
autoscaler's node types, read

    from the GCS, where an autoscaler that reports its cluster config keeps it (Ray Train reads it there
        for the same check), or
    from the bootstrap config `ray up` leaves on the head node (~/ray_bootstrap_config.yaml; Ray Tune
        reads it to tell an autoscaling cluster), where a `ray job submit` driver runs;

and, without either, with the nodes up now: exactly what a Ray started by ioisray (no autoscaler) has,
and a lower bound for a cluster whose autoscaler cannot be seen from here, which is then only warned about.

On a cluster of more than one node, every path that a process on another node reads or writes must
name storage every node reaches (a filesystem URI): checked here before anything starts.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from ioisray import storage
from ioisray.config import Config, ConfigError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # written on the head node by `ray up`


@dataclass(frozen=True)
class Capacity:
    """nodes: the resources of every node up now and of every node type the autoscaler can add;
    most: per resource, the most the cluster has or can scale to; max_nodes: the most nodes at once;
    autoscaler: True (its node types are known), False (there is none: a Ray ioisray started), None
    (a cluster whose autoscaler cannot be seen from this process: `most` is what is up now)."""

    nodes: list[dict[str, float]]
    most: dict[str, float]
    max_nodes: float
    autoscaler: Optional[bool]
    nodes_up: int = 1
    addable: tuple = ()  # (resources, how many) of each node type the autoscaler can add

    @property
    def has(self) -> str:
        return {True: "has or can scale to", False: "has", None: "has now"}[self.autoscaler]

    @property
    def multi_node(self) -> bool:
        return self.nodes_up > 1 or self.max_nodes > 1


@dataclass(frozen=True)
class Request:
    """`count` processes (Ray Train workers, synthesis actors) holding `each` resources; `keys` names the
    config key behind each resource ("*": custom resources) and `count_key` the one behind `count`."""

    count_key: str
    count: int
    each: dict[str, float]
    keys: dict[str, str]

    def key(self, resource: str) -> str:
        return self.keys.get(resource, self.keys["*"])


def trainer_request(cfg: Config) -> Optional[Request]:
    """The run's Ray Train workers (None with ray.num_workers=0: the loop runs in the driver)."""
    from ioisray.experiments import worker_resources

    if not cfg.ray.num_workers:
        return None
    return Request("ray.num_workers", cfg.ray.num_workers, worker_resources(cfg),
                   {"CPU": "ray.cpus_per_worker", "GPU": "ray.use_gpu", "*": "ray.resources_per_worker"})


def pool_request(cfg: Config) -> Request:
    """The run's synthesis actors."""
    s = cfg.synthesis
    return Request("synthesis.pool_size", s.pool_size, {"CPU": s.num_cpus, "GPU": s.num_gpus, **s.resources},
                   {"CPU": "synthesis.num_cpus", "GPU": "synthesis.num_gpus", "*": "synthesis.resources"})


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items() if v) + "}"


def check_fits(requests: list[Optional[Request]], capacity: Capacity) -> None:
    """Raise a one-line ConfigError naming the keys when `requests`, together, can never be placed on the
    cluster: a process asks for more than any node has, or all of them for more of a resource than the
    cluster has or can scale to. Where the cluster's autoscaler cannot be seen, the line is a warning."""
    requests = [r for r in requests if r is not None and r.count > 0]
    problem = None
    for r in requests:
        wanted = {k: v for k, v in r.each.items() if v > 0}
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in wanted.items()) for node in capacity.nodes):
            nodes = sorted({"{" + ", ".join(f"{k}: {n.get(k, 0.0):g}" for k in wanted) + "}" for n in capacity.nodes})
            problem = (f"{', '.join(dict.fromkeys(r.key(k) for k in wanted))}: each of the {r.count_key}={r.count} "
                       f"processes asks for {_fmt(wanted)}, but no node of the cluster has that much "
                       f"({'its nodes and node types' if capacity.autoscaler else 'its nodes'}: "
                       f"{', '.join(nodes) or 'none'})")
            break
    if problem is None:
        need: dict[str, float] = {}
        for r in requests:
            for k, v in r.each.items():
                need[k] = need.get(k, 0.0) + v * r.count
        for k, v in need.items():
            have = capacity.most.get(k, 0.0)
            if v > have + 1e-9:
                parts = " + ".join(f"{r.count_key}={r.count} x {r.key(k)} ({r.each[k]:g} {k})"
                                   for r in requests if r.each.get(k))
                problem = f"{parts} = {v:g} {k}, but the cluster {capacity.has} {have:g} {k}"
                break
    if problem is None and not _can_place(requests, capacity):
        problem = (f"{' and '.join(f'{r.count_key}={r.count} x {_fmt(r.each)}' for r in requests)} cannot be placed "
                   f"on the cluster's nodes together ({', '.join(dict.fromkeys(r.key(k) for r in requests for k in r.each if r.each[k]))}; "
                   f"its nodes{' and node types' if capacity.autoscaler else ''}: "
                   f"{', '.join(sorted({_fmt({k: n.get(k, 0.0) for r in requests for k in r.each}) for n in capacity.nodes}))})")
    if problem is None:
        return
    if capacity.autoscaler is None:
        print(f"[ioisray] warning: {problem}; the run waits until the cluster has them", flush=True)
        return
    raise ConfigError(problem)


def _can_place(requests: list[Request], capacity: Capacity, budget: int = 100_000) -> bool:
    """Whether every process of `requests` finds a place on the nodes up now and those the autoscaler can
    add (a search over the ways to place them, largest first; True when the search runs out of `budget`
    steps, so that a check never refuses what it could not decide)."""
    bundles = sorted(({k: v for k, v in r.each.items() if v > 0} for r in requests for _ in range(r.count)),
                     key=lambda b: (-len(b), -b.get("GPU", 0.0), -b.get("CPU", 0.0)))
    up = capacity.nodes[:capacity.nodes_up] if capacity.autoscaler else capacity.nodes
    nodes = [dict(n) for n in up]
    for shape, count in capacity.addable:  # no more of a type than there are processes to place
        nodes += [dict(shape) for _ in range(int(min(count, len(bundles))))]
    steps = [0]

    def place(i: int) -> bool:
        if i == len(bundles):
            return True
        steps[0] += 1
        if steps[0] > budget:
            return True
        tried = set()
        for node in nodes:
            key = tuple(sorted(node.items()))
            if key in tried or any(node.get(k, 0.0) + 1e-9 < v for k, v in bundles[i].items()):
                continue
            tried.add(key)  # identical nodes: one try
            for k, v in bundles[i].items():
                node[k] -= v
            if place(i + 1):
                return True
            for k, v in bundles[i].items():
                node[k] += v
        return False

    return place(0)


# Paths read or written by processes that may run on any node: the run's outputs (rank 0 writes the
# checkpoints, the driver reads them), the diffusion model (the synthesis actors load it), the
# classifier's initial weights (every training worker reads them) and the run whose model filters the
# synthetic images (the synthesis actors load it).
SHARED_PATHS = ("output_dir", "diffusion.model_dir", "model.weights", "model.pretrained_file", "synthesis.filter_model")


def check_shared_paths(cfg: Config, capacity: Capacity) -> None:
    """On a cluster of more than one node (up now, or possible), a one-line ConfigError for the first
    path of SHARED_PATHS that is a path on this node's disk rather than a URI every node reaches. A
    `file://` URI says that the path is a mount every node has (NFS, EFS, ...) and is taken as such."""
    if not cfg.ray.address or not capacity.multi_node:
        return
    for key in SHARED_PATHS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value and not storage.is_uri(value):
            nodes = (f"{capacity.nodes_up} nodes" if capacity.nodes_up > 1 else
                     f"{'any number of' if math.isinf(capacity.max_nodes) else f'up to {capacity.max_nodes:g}'} "
                     f"nodes")
            raise ConfigError(f"{key}: {value!r} is a path on one node's disk, but this cluster has {nodes} and "
                              f"processes on the others read it too: give a URI that every node reaches "
                              f"(s3://bucket/..., gs://..., or file:///mnt/nfs/... for a mount every node has)")


def capacity(cfg: Config) -> Capacity:
    """What the Ray this process is connected to has or can scale to (see the module's docstring)."""
    import ray

    up = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"]]
    # A Ray that ioisray started itself has no autoscaler (a stray bootstrap file on this machine aside).
    types = (_gcs_node_types() or _bootstrap_node_types()) if cfg.ray.address else None
    return combine(up, types, on_a_cluster=bool(cfg.ray.address))


def combine(up: list[dict[str, float]], types: Optional[tuple[list[dict], dict, float]],
            on_a_cluster: bool) -> Capacity:
    """The Capacity of the nodes `up` now and the autoscaler's node `types` (None: none seen)."""
    now: dict[str, float] = {}
    for node in up:
        for k, v in node.items():
            now[k] = now.get(k, 0.0) + v
    if types is None:
        return Capacity(up, now, len(up), None if on_a_cluster else False, len(up))
    addable, most, max_nodes = types
    return Capacity(up + [shape for shape, _ in addable],
                    {k: max(now.get(k, 0.0), most.get(k, 0.0)) for k in {*now, *most}},
                    max(max_nodes, len(up)), True, len(up), tuple(addable))


def _gcs_node_types() -> Optional[tuple[list[dict], dict, float]]:
    """(node types' resources, the most of each resource, the most nodes) from the cluster config an
    autoscaler reported to the GCS; None when there is none."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or a client-mode Ray: read nothing here
        return None
    groups = [g for g in (config.node_group_configs if config else []) if g.max_count != 0]
    if not groups:
        return None
    most: dict[str, float] = {}
    for g in groups:
        for k, v in g.resources.items():
            most[k] = most.get(k, 0.0) + (math.inf if g.max_count < 0 else v * g.max_count)
    for k, cap in config.max_resources.items():
        if k in most:
            most[k] = min(most[k], float(cap))
    max_nodes = math.inf if any(g.max_count < 0 for g in groups) else float(sum(g.max_count for g in groups))
    return ([({k: float(v) for k, v in g.resources.items()}, math.inf if g.max_count < 0 else float(g.max_count))
             for g in groups], most, max_nodes)


def _bootstrap_node_types(path: str = BOOTSTRAP_CONFIG) -> Optional[tuple[list[dict], dict, float]]:
    """The same from `ray up`'s bootstrap config on this node (the head): the head node plus, within the
    cluster's max_workers, each worker type's max_workers nodes. None where there is no such file."""
    import yaml

    try:
        with open(os.path.expanduser(path)) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    types = (config or {}).get("available_node_types") or {}
    head = config.get("head_node_type")
    if head not in types:
        return None
    room = config.get("max_workers", math.inf)
    workers = {name: min(t.get("max_workers", 0), room) for name, t in types.items()}
    shapes = [({k: float(v) for k, v in (t.get("resources") or {}).items()}, float(workers[name] + (name == head)))
              for name, t in types.items()]
    resources = {k for shape, _ in shapes for k in shape}
    most = {}
    for k in resources:
        # The head, then the cluster's worker nodes given to the types with the most of this resource.
        total, left = float((types[head].get("resources") or {}).get(k, 0.0)), room
        for name, t in sorted(types.items(), key=lambda item: -(item[1].get("resources") or {}).get(k, 0.0)):
            n = min(workers[name], left)
            total, left = total + n * (t.get("resources") or {}).get(k, 0.0), left - n
        most[k] = total
    return shapes, most, 1 + min(room, sum(workers.values()))
