"""Data-parallel training on a real two-process gloo group (the CPU substitute for NCCL workers): one
DDP epoch through the training core, and a resume from rank 0's checkpoint on both ranks through the
worker's own `prepare_and_resume`."""
import numpy as np
import torch
from cli_utils import ROOT
from torch.nn.parallel import DistributedDataParallel

import gloo_group
from ioisray.checkpoint import CheckpointStore, TrainingState
from ioisray.config import load_config
from ioisray.distributed import barrier
from ioisray.engine import numpy_batches, train_one_epoch
from ioisray.losses import create_loss
from ioisray.models import unwrap
from ioisray.recipes.worker import Worker
from ioisray.transforms import eval_transform

CLASSES = 3


def _data(rank):
    """Each rank its own images: 8 of class 0, 4 of class 1, 2 of class 2 (different pixels per rank)."""
    rng = np.random.default_rng(rank)
    labels = np.repeat(np.arange(CLASSES), [8, 4, 2])
    return rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8), labels


def _fresh():
    torch.manual_seed(0)  # the same initial weights on both ranks, as the recipes seed them
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def _epoch(model, optimizer, scheduler, rank, epoch):
    images, labels = _data(rank)
    stats = train_one_epoch(model, numpy_batches(images, labels, 4, shuffle_seed=epoch), create_loss("ce", [8, 4, 2]),
                            optimizer, eval_transform, CLASSES, torch.device("cpu"))
    scheduler.step()
    return stats


def _worker(rank, tmp_path):
    worker = Worker.__new__(Worker)  # a Ray Train worker's state, without Ray: rank, device, checkpoints
    worker.cfg = load_config(ROOT / "configs/digits.yaml")
    worker.rank, worker.world, worker.device = rank, 2, torch.device("cpu")
    worker.checkpoints = CheckpointStore(str(tmp_path / "checkpoints"))
    worker.prepare = DistributedDataParallel  # what ray.train.torch.prepare_model does on CPU workers
    return worker


def _train_and_resume(rank, tmp_path):
    # Two epochs straight through.
    model, optimizer, scheduler = _fresh()
    model = DistributedDataParallel(model)
    first = _epoch(model, optimizer, scheduler, rank, 0)
    _epoch(model, optimizer, scheduler, rank, 1)
    straight = unwrap(model).state_dict()
    # One epoch, rank 0's checkpoint, then a new process's worth of objects resumes on both ranks.
    model, optimizer, scheduler = _fresh()
    model = DistributedDataParallel(model)
    _epoch(model, optimizer, scheduler, rank, 0)
    if rank == 0:
        CheckpointStore(str(tmp_path / "checkpoints")).save(TrainingState(
            epoch=1, model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict()))
    barrier()
    model, optimizer, scheduler = _fresh()
    model, state = _worker(rank, tmp_path).prepare_and_resume(model, optimizer, scheduler)
    assert isinstance(model, DistributedDataParallel) and state.epoch == 1
    assert scheduler.last_epoch == 1 and optimizer.state  # momentum came back
    _epoch(model, optimizer, scheduler, rank, 1)
    resumed = unwrap(model).state_dict()
    torch.save({"first_total": torch.from_numpy(first.total), "straight": straight, "resumed": resumed},
               tmp_path / f"rank{rank}.pt")


def test_ddp_epoch_and_resume_on_two_ranks(tmp_path):
    gloo_group.run(_train_and_resume, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Per-class counts are summed over both ranks' images (8+8, 4+4, 2+2), for AAS.
    assert ranks[0]["first_total"].tolist() == ranks[1]["first_total"].tolist() == [16, 8, 4]
    for key in ("straight", "resumed"):  # DDP keeps the replicas identical
        assert all(torch.equal(ranks[0][key][k], ranks[1][key][k]) for k in ranks[0][key])
    # The resumed run continues exactly where the straight one went (momentum and lr schedule included).
    assert all(torch.allclose(ranks[0]["straight"][k], ranks[0]["resumed"][k], atol=1e-6) for k in ranks[0]["straight"])
    assert not all(torch.equal(ranks[0]["straight"][k], _fresh()[0].state_dict()[k]) for k in ranks[0]["straight"])


def _pretraining_loss(rank, tmp_path):
    from ioisray.recipes.pretrain_diffusion import epoch_loss

    # Rank 0 saw 3 images with loss 1 each, rank 1 one image with loss 5: the epoch's loss is 8 / 4.
    loss, images = epoch_loss(torch.tensor(3.0 if rank == 0 else 5.0), 3 if rank == 0 else 1)
    assert (loss, images) == (2.0, 4)


def test_diffusion_pretraining_loss_is_every_ranks():
    gloo_group.run(_pretraining_loss, None)
