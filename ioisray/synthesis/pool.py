"""The synthesis pool: long-lived generator actors, fed one chunk at a time as they become idle.

    SynthesisActor   one per `synthesis.pool_size`: builds its DiffusionGenerator (loads the model) once;
                     each call makes one chunk, guided by the classifier snapshot that comes with the
                     call (by reference; fetched once per epoch). Ray restarts an actor that dies and
                     retries its call, so a restarted actor is guided like the others.
    PoolCoordinator  an async actor that owns the actors and the epoch's queue of chunks: every actor
                     holds one chunk, and gets the next the moment it hands one back, so a fast actor
                     makes more and a slow one never holds the epoch back (no static split). Readers ask
                     it for chunk i's result (an ObjectRef: images go actor -> object store -> training
                     worker, never through it). An actor gone for good is replaced and its chunk made
                     again, so every chunk is delivered exactly once.
    SynthesisPool    the handle the rest of ioisray uses: plain calls that wait, picklable.

All clocks are read where they tick: actors time their own chunks, the coordinator times the epoch.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Callable, Optional

import numpy as np
import ray

from ioisray.synthesis.plan import Chunk
from ioisray.synthesis.tally import filtered_per_class

# An actor that died for good, or a lost result: the chunk is made again. Anything else is a bug: raised.
RECOVERABLE = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


class SynthesisActor:
    """Holds one generator for the whole run (the diffusion model is loaded once per process)."""

    def __init__(self, make_generator: Callable):
        self.generator = make_generator()
        self.weights_id: Optional[str] = "none yet"

    def generate(self, plan_epoch: int, chunk: Chunk, weights: list):
        """Chunk's images; `weights` is [ObjectRef of the guide's state dict] or [None] (unguided), in a
        list so that Ray hands over the reference, not the value: it is fetched once per snapshot."""
        ref = weights[0]
        key = None if ref is None else ref.hex()
        if key != self.weights_id:
            self.generator.set_classifier(None if ref is None else ray.get(ref))
            self.weights_id = key
        out = self.generator.generate(chunk.labels, chunk.seeds)
        seconds = out.pop("seconds")
        filtered = out.pop("filtered", None)  # images synthesis.filter dropped, per class
        n = len(out["label"])  # the chunk's images, less those dropped
        out["synthetic"] = np.ones(n, dtype=np.int8)
        out["plan_epoch"] = np.full(n, plan_epoch, dtype=np.int64)
        timing = {"chunk": chunk.index, "images": len(chunk), "seconds": seconds, "pid": os.getpid(),
                  "node_id": ray.get_runtime_context().get_node_id(), "gpu_memory_mb": _gpu_memory_mb(),
                  "filtered": None if filtered is None else [int(v) for v in filtered]}
        return out, timing

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


def _gpu_memory_mb():
    """This process's peak CUDA memory so far (None without CUDA, or when the generator never imported torch)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


class _Epoch:
    """One epoch's queue of chunks and what became of each."""

    def __init__(self, plan_epoch: int, chunks: list[Chunk], weights):
        self.plan_epoch, self.chunks, self.weights = plan_epoch, chunks, weights
        self.started = time.monotonic()  # the coordinator's clock: every offset below is on it
        self.queue = list(range(len(chunks)))  # chunks no actor has taken yet, in order
        self.refs: list = [None] * len(chunks)  # per chunk: ObjectRef of its rows, once handed out
        self.handed_out = [asyncio.Event() for _ in chunks]
        self.timings: list[Optional[dict]] = [None] * len(chunks)
        self.done_after: list[Optional[float]] = [None] * len(chunks)
        self.errors: list[Optional[str]] = [None] * len(chunks)
        self.attempts = [0] * len(chunks)

    @property
    def finished(self) -> bool:
        return all(t is not None for t in self.timings)


class PoolCoordinator:
    """Feeds `size` SynthesisActors the current epoch's chunks, one at a time each (an async actor: its
    calls interleave on one thread, so its bookkeeping needs no locks)."""

    def __init__(self, make_generator: Callable, size: int, actor_options: dict, max_retries: int = 3,
                 start_timeout: Optional[float] = None):
        self._make_generator, self._options, self._max_retries = make_generator, actor_options, max_retries
        self._start_timeout, self._start_deadline = start_timeout, None
        self.actors = [self._start_actor() for _ in range(size)]
        self.processes: list[Optional[tuple]] = [None] * size  # per slot: (node id, pid) of its actor's process
        self.actors_started = size  # replacements and Ray's restarts counted too
        self._up = False  # every actor answered once (ready)
        self.epoch: Optional[_Epoch] = None
        self._feeding: Optional[asyncio.Future] = None

    def _start_actor(self):
        # Ray restarts a dead actor process and retries the call it was running (the model is loaded
        # again, the call brings the guide's weights): most failures never reach the code below.
        return ray.remote(SynthesisActor).options(max_restarts=self._max_retries, max_task_retries=self._max_retries,
                                                  **self._options).remote(self._make_generator)

    async def ready(self) -> list[dict]:
        """Waits until every actor has loaded its model; their pid and node. An actor that could not
        start (its model failed to load) is a RuntimeError that says so, and so are actors still waiting
        for a node with room for them when the pool's start time-out has passed (a request the cluster
        cannot meet would otherwise keep the run waiting forever); actors placed by then, loading their
        model, are waited for."""
        answers = asyncio.ensure_future(asyncio.gather(*(a.info.remote() for a in self.actors)))
        if self._start_timeout is not None and self._start_deadline is None:  # from the first wait on
            self._start_deadline = time.monotonic() + self._start_timeout
        try:
            if self._start_deadline is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(answers), max(0.0, self._start_deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    waiting = self._waiting_for_a_node()
                    if waiting:
                        answers.cancel()
                        options = {"CPU": self._options.get("num_cpus"), "GPU": self._options.get("num_gpus"),
                                   **self._options.get("resources", {})}
                        raise RuntimeError(
                            f"synthesis: {waiting} of {len(self.actors)} actors found no node with room for "
                            f"{ {k: v for k, v in options.items() if v} } within {self._start_timeout:g} s "
                            f"(synthesis.start_timeout_s): the cluster does not have the free resources that "
                            f"synthesis.pool_size, num_cpus, num_gpus and resources ask for beside the trainer's "
                            f"(ray.*)") from None
            infos = await answers
        except RECOVERABLE as e:
            raise RuntimeError(f"a synthesis actor could not start: {e}") from None
        self.processes, self._up = [(i["node_id"], i["pid"]) for i in infos], True
        return infos

    def _waiting_for_a_node(self) -> int:
        """How many actors no node has taken yet (no worker process: Ray's actor table shows pid 0 until
        a node with room for the actor starts it)."""
        from ray._private import state

        return sum(1 for a in self.actors if not (state.actors(a._actor_id.hex()) or {}).get("Pid"))

    async def start_epoch(self, plan_epoch: int, chunks: list[Chunk], weights: list, reuse: bool = False) -> None:
        """Start making `chunks`; `weights` is [ObjectRef of the guide's weights] or [None] (unguided).
        reuse=True keeps what was made for the same plan epoch (offline synthesis: one set, made once).
        The first call waits until the actors are up, so the epoch's clock starts with a loaded model."""
        if not self._up:
            await self.ready()
        e = self.epoch
        if reuse and e is not None and e.plan_epoch == plan_epoch and len(e.chunks) == len(chunks) \
                and not any(e.errors):
            return
        if self._feeding is not None and not self._feeding.done():
            self._feeding.cancel()  # an epoch started again (a restarted training run): its old plan is void
        self.epoch = _Epoch(plan_epoch, chunks, weights[0])
        self._feeding = asyncio.ensure_future(asyncio.gather(*(self._feed(slot, self.epoch)
                                                               for slot in range(len(self.actors)))))

    async def _feed(self, slot: int, epoch: _Epoch) -> None:
        """One actor's loop: take the next chunk of the epoch's queue, make it, repeat. One chunk at a
        time, so a slow actor never sits on a chunk a fast one would finish sooner (measured: a second
        chunk queued at each actor cost more at the end of an epoch than it saved in waiting)."""
        while epoch.queue:
            i = epoch.queue.pop(0)
            data, timing = self.actors[slot].generate.options(num_returns=2).remote(
                epoch.plan_epoch, epoch.chunks[i], [epoch.weights])
            epoch.refs[i] = data
            epoch.handed_out[i].set()
            try:
                result = await timing
            except RECOVERABLE as e:  # the actor is gone for good: replace it, make the chunk again
                epoch.attempts[i] += 1
                if epoch.attempts[i] > self._max_retries:
                    epoch.errors[i] = f"{type(e).__name__}: {e}"
                    continue
                epoch.queue.insert(0, i)
                epoch.handed_out[i] = asyncio.Event()
                self._replace(slot)
                continue
            process = (result["node_id"], result["pid"])  # a pid names a process on its own node only
            if self.processes[slot] is not None and process != self.processes[slot]:
                self.actors_started += 1  # Ray restarted this actor's process (perhaps on another node)
            self.processes[slot] = process
            epoch.timings[i], epoch.done_after[i] = {**result, "slot": slot}, time.monotonic() - epoch.started

    def _replace(self, slot: int) -> None:
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._start_actor()
        self.processes[slot] = None
        self.actors_started += 1

    async def chunk(self, i: int, failed: Optional[str] = None):
        """(plan epoch, [ObjectRef of chunk i's rows]) once an actor has it; the list keeps Ray from
        resolving the ref here. `failed`: the hex of a ref that could not be read, so wait for its
        replacement."""
        e = self.epoch
        if e is None or i >= len(e.chunks):
            raise IndexError(f"chunk {i} asked for, but this epoch's plan has {0 if e is None else len(e.chunks)} "
                             f"chunks: the synthetic dataset was made for another budget or chunk size")
        while True:
            await e.handed_out[i].wait()
            if e.errors[i]:
                raise RuntimeError(f"synthesis chunk {i} failed {e.attempts[i]} times (synthesis.max_retries="
                                   f"{self._max_retries}): {e.errors[i]}")
            if failed is None or e.refs[i].hex() != failed:
                return e.plan_epoch, [e.refs[i]]
            await asyncio.sleep(0.05)  # the feeder is replacing the actor that held it

    async def epoch_stats(self) -> dict:
        """This epoch so far: images and images/s per actor slot, in slot order (the actors' own timings;
        a slot whose actor was restarted or replaced is still one actor), seconds from the epoch's start
        to its first and last finished chunk (the coordinator's clock), nodes used."""
        e = self.epoch
        if e is None:
            return {}
        by_actor: dict[int, list[dict]] = {}
        for t in sorted((t for t in e.timings if t is not None), key=lambda t: t["slot"]):
            by_actor.setdefault(t["slot"], []).append(t)
        done = [d for d in e.done_after if d is not None]
        return {
            "filtered_per_class": filtered_per_class(e.timings),
            "images_per_second": [sum(t["images"] for t in ts) / max(sum(t["seconds"] for t in ts), 1e-9)
                                  for ts in by_actor.values()],
            "images": [sum(t["images"] for t in ts) for ts in by_actor.values()],
            "node_ids": sorted({t["node_id"] for ts in by_actor.values() for t in ts}),
            "gpu_memory_mb": [max((t["gpu_memory_mb"] or 0) for t in ts) or None for ts in by_actor.values()],
            "seconds_to_first_chunk": min(done, default=None),
            "generation_seconds": max(done) if e.finished else None,
            "finished": e.finished,
            "actors_started": self.actors_started,
        }

    def actor_handles(self) -> list:
        return [[a] for a in self.actors]

    def shutdown(self) -> None:
        if self._feeding is not None:
            self._feeding.cancel()
        for a in self.actors:
            ray.kill(a, no_restart=True)


class SynthesisPool:
    """The pool as training sees it: plain calls that wait, no Ray in the caller's code. Picklable (it
    holds the coordinator's handle), so it travels to the training workers in their loop config."""

    def __init__(self, coordinator, size: int):
        self.coordinator, self.size = coordinator, size

    @classmethod
    def start(cls, make_generator: Callable, size: int, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
              resources: Optional[dict] = None, max_retries: int = 3, wait: bool = False,
              start_timeout: Optional[float] = None) -> "SynthesisPool":
        """`size` actors (each `num_cpus`, `num_gpus`, custom `resources`), loading their models. Returns
        at once: a run's training workers start while the actors load (both take seconds), and the
        first `start_epoch` waits for the actors; `wait=True` waits here. Actors that no node has taken
        `start_timeout` seconds into that wait fail it (None: it waits for ever)."""
        # "DEFAULT" scheduling: started from a Tune trial, the actors would otherwise be placed in the
        # trial's own placement group (0.1 CPU), where they do not fit.
        options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(resources or {}),
                   "scheduling_strategy": "DEFAULT"}
        coordinator = ray.remote(PoolCoordinator).options(num_cpus=0, scheduling_strategy="DEFAULT").remote(
            make_generator, size, options, max_retries, start_timeout)
        if wait:
            ray.get(coordinator.ready.remote())
        return cls(coordinator, size)

    @classmethod
    def for_run(cls, cfg, model_dir: str, num_classes: int) -> "SynthesisPool":
        """The pool of a run's config: `synthesis.pool_size` actors with `synthesis.*` resources, each
        loading the diffusion model in `model_dir` once. Refused first, naming the keys, when the
        cluster cannot place the actors and the run's Ray Train workers together."""
        from ioisray import cluster
        from ioisray.synthesis.generator import generator_factory

        cluster.check_fits([cluster.trainer_request(cfg), cluster.pool_request(cfg)], cluster.capacity(cfg))
        sy = cfg.synthesis
        return cls.start(generator_factory(cfg, model_dir, num_classes), sy.pool_size, num_cpus=sy.num_cpus,
                         num_gpus=sy.num_gpus, resources=sy.resources, max_retries=sy.max_retries,
                         start_timeout=sy.start_timeout_s)

    def start_epoch(self, plan_epoch: int, chunks: list[Chunk], weights: Optional[dict], reuse: bool = False) -> None:
        """Start making this epoch's chunks, guided by `weights` (a state dict of CPU tensors; None:
        unguided). Returns once the plan is in place: readers may then ask for any chunk."""
        ref = ray.put(weights) if weights is not None else None
        ray.get(self.coordinator.start_epoch.remote(plan_epoch, chunks, [ref], reuse))

    def epoch_stats(self) -> dict:
        return ray.get(self.coordinator.epoch_stats.remote())

    def wait_until_made(self, timeout: Optional[float] = None) -> dict:
        """Blocks until every chunk of the epoch is made (or `timeout` s passed); the epoch's stats."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (stats := self.epoch_stats()).get("finished") and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        return stats

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the actors, waiting at most `timeout` s for the coordinator to: a SIGTERM sent to every
        process of a job (systemd, Slurm) also ends its Ray, and a wait without a limit then lasts until
        Ray's client gives up on the lost GCS and ends the driver, before it can say where the run stopped.
        The actors belong to the coordinator: killing it stops any it did not."""
        try:
            ray.get(self.coordinator.shutdown.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 - gone or not answering: killed below all the same
            pass
        ray.kill(self.coordinator)
