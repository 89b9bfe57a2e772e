"""What every recipe's training worker does around its own epochs (the skeleton `train.py` and
`pretrain_diffusion.py` share): set up the process, resume from the run's newest checkpoint that
loads, seed each epoch, checkpoint (rank 0) and report (every rank, as Ray Train requires the same
number of reports from each), and keep TensorBoard events on rank 0.

Runs inside a Ray Train worker, or in the driver's own process with `ray.num_workers=0` (see
recipes/launch.in_process); the checkpoints are the run's own (ioisray/checkpoint.py), so both resume the same way,
and Ray Train's restart after a worker failure resumes from them too.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from ioisray import storage
from ioisray.checkpoint import CheckpointStore, TrainingState
from ioisray.config import Config


def cpu_batches(device) -> dict:
    """iter_torch_batches options: batches stay on the CPU (pinned when training on a GPU, so they move
    without blocking) with two prefetched, and the training loop moves what it needs. Ray's default,
    device="auto", would put them on the GPU, and every look at a metadata column (is it synthetic?
    which epoch?) would then wait for the GPU."""
    return {"device": "cpu", "pin_memory": getattr(device, "type", "cpu") == "cuda", "prefetch_batches": 2}


def epoch_generator(cfg: Config, rank: int, epoch: int) -> torch.Generator:
    """This worker's random stream for one epoch, from (seed, rank, epoch): a resumed run replays it.
    Also reseeds torch's global RNGs (augmentation, noise draws; CUDA's too) from the same stream."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + epoch)
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    return gen


class Worker:
    """One training process of a run. `loop_config` carries where the run's checkpoints and
    TensorBoard events go (see `locations`)."""

    def __init__(self, cfg: Config, loop_config: dict):
        from ioisray.precision import configure_device
        from ioisray.recipes.launch import in_process_run

        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
        self.cfg = cfg
        self.local = in_process_run()
        if self.local is not None:
            self.rank, self.world = 0, 1
            # With an index, as Ray Train's devices have one (a per-device setting needs it).
            self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.ray.use_gpu else torch.device("cpu")
        else:
            import ray.train
            import ray.train.torch

            from ioisray.recipes.console import quiet_ray_train

            quiet_ray_train()
            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()
        # A worker holding a fraction of a GPU (ray.resources_per_worker) caps its memory to that share.
        configure_device(self.device, cfg.ray.resources_per_worker.get("GPU", 1.0) if cfg.ray.use_gpu else 1.0)
        self.checkpoints = CheckpointStore(loop_config["checkpoints"])
        self.writer = self.events = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.events = storage.EventsDir(loop_config["tensorboard_dir"], loop_config["tensorboard_uri"])
            self.writer = SummaryWriter(self.events.path)

    def shard(self, name: str):
        """This worker's part of the run's dataset `name` (all of it in this process, or when not split)."""
        if self.local is not None:
            return self.local["datasets"][name]
        import ray.train

        return ray.train.get_dataset_shard(name)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this worker's device, wrapped for data-parallel training when there are several."""
        if self.local is not None:
            return model.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def batches(self, shard, batch_size: int, **options):
        """A shard's batches for this worker's device (see cpu_batches); in the driver's own process,
        the loop stops at the next batch once Ctrl-C is pressed (recipes/launch.STOP)."""
        from ioisray.recipes.launch import STOP

        batches = iter(shard.iter_torch_batches(batch_size=batch_size, dtypes=None, **cpu_batches(self.device),
                                                **options))
        try:
            for batch in batches:
                if STOP.is_set():
                    raise KeyboardInterrupt
                yield batch
        finally:  # stops the shard's dataset execution now, not when the iterator is collected (after Ray)
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def prepare_and_resume(self, model: torch.nn.Module, optimizer, scheduler,
                           what: str = "") -> tuple[torch.nn.Module, TrainingState]:
        """The model prepared (`prepare`), then the run's newest checkpoint that loads (the final one
        first) loaded into it, the optimizer and the scheduler, or a fresh state. In that order because
        `Optimizer.load_state_dict` puts its state (momentum, Adam moments) on the parameters' device as
        they are at load time: loaded before the move, it would stay on the CPU under CUDA parameters.
        Method state (EMA, AAS, ...) is in `state.extra`."""
        from ioisray.models.wrapping import unwrap

        model = self.prepare(model)
        found = self.checkpoints.latest(log=self.log)
        if found is None:
            return model, TrainingState(epoch=0, model={}, optimizer={}, scheduler={}, seed=self.cfg.seed)
        name, state = found
        unwrap(model).load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        self.log(f"[{self.cfg.name}] resumed {what}from epoch {state.epoch} (checkpoint {name})")
        return model, state

    def epochs(self, state: TrainingState, total: int) -> Iterator[int]:
        """The epochs left to run, each with its random streams seeded (`self.generator`)."""
        for epoch in range(state.epoch, total):
            self.generator = epoch_generator(self.cfg, self.rank, epoch)
            yield epoch

    def end_epoch(self, metrics: dict, state: Optional[TrainingState] = None, files: Optional[dict] = None,
                  name: Optional[str] = None) -> None:
        """Rank 0 writes the checkpoint (`state`, extra `files`), then every rank reports `metrics`."""
        if self.rank == 0:
            if state is not None:
                self.checkpoints.save(state, files, name)
            self.writer.flush()
            self.events.sync()
        if self.local is not None:
            for callback in self.local["callbacks"]:
                callback.after_report(None, [metrics], None)
            return
        import ray.train

        ray.train.report(metrics)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.events.close()


def locations(run) -> dict:
    """Loop-config entries telling workers where the run (ioisray.run.Run) keeps checkpoints and events:
    TensorBoard events go to the run folder, or, for a URI run (rank 0 may be on another node than the
    driver), to a temporary folder uploaded every epoch (storage.EventsDir)."""
    uri = storage.is_uri(run.cfg.output_dir)
    return {"checkpoints": run.checkpoints.location, "tensorboard_dir": str(run.dir / "tensorboard"),
            "tensorboard_uri": run.uri("tensorboard") if uri else None}
