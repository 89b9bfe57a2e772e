"""The training worker's skeleton in the driver's own process (ray.num_workers=0): no Ray Train, its
datasets read whole, its epoch reports handed to the run's callbacks (how a Tune trial hears of them)."""
import torch
from cli_utils import ROOT

from ioisray.checkpoint import TrainingState
from ioisray.config import load_config
from ioisray.recipes.launch import in_process
from ioisray.recipes.worker import Worker


class Recorder:
    def __init__(self):
        self.reports = []

    def after_report(self, run_context, metrics, checkpoint):
        self.reports.append((run_context, metrics, checkpoint))


def _loop_config(tmp_path):
    return {"checkpoints": str(tmp_path / "checkpoints"), "tensorboard_dir": str(tmp_path / "tb"),
            "tensorboard_uri": None}


def test_in_process_worker_reads_its_datasets_and_reports_to_the_callbacks(tmp_path):
    cfg = load_config(ROOT / "configs/digits.yaml", ["ray.num_workers=0"])
    datasets, recorder = {"train": object(), "val": object()}, Recorder()
    model = torch.nn.Linear(2, 2)
    with in_process(datasets, (recorder,)):
        worker = Worker(cfg, _loop_config(tmp_path))
        assert (worker.rank, worker.world, worker.device) == (0, 1, torch.device("cpu"))
        assert worker.shard("train") is datasets["train"] and worker.shard("val") is datasets["val"]
        assert worker.prepare(model) is model  # on the CPU, no DDP wrapper
        state = TrainingState(epoch=1, model=model.state_dict(), optimizer={}, scheduler={}, seed=0)
        worker.end_epoch({"epoch": 0, "val_balanced_accuracy": 0.5}, state)
        worker.close()
    assert recorder.reports == [(None, [{"epoch": 0, "val_balanced_accuracy": 0.5}], None)]
    assert worker.checkpoints.names() == ["epoch_00001"]  # rank 0 saved the epoch's checkpoint


def test_in_process_worker_on_a_gpu_names_the_device_index(tmp_path, monkeypatch):
    # A per-device CUDA setting (the memory cap of a fractional GPU) needs "cuda:N", not "cuda".
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cfg = load_config(ROOT / "configs/digits.yaml", ["ray.num_workers=0", "ray.use_gpu=true"])
    with in_process({}):
        worker = Worker(cfg, _loop_config(tmp_path))
    assert worker.device == torch.device("cuda", 0)
    worker.close()


def _sgd_run(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    return optimizer, scheduler


def test_resumed_optimizer_state_lands_on_the_prepared_models_device(tmp_path):
    # A GPU worker moves the model in `prepare`; an optimizer state loaded before that move stays on
    # the CPU and the first step mixes devices. Optimizer.load_state_dict casts its state to the
    # parameters' dtype as it does to their device, and a move to float64 keeps the parameters'
    # identity as a move to CUDA does (a move to "meta" would not): it stands in for the GPU here.
    cfg = load_config(ROOT / "configs/digits.yaml", ["ray.num_workers=0"])
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = _sgd_run(model)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # momentum buffers exist now
    with in_process({}):
        worker = Worker(cfg, _loop_config(tmp_path))
        worker.end_epoch({}, TrainingState(epoch=1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                           scheduler=scheduler.state_dict(), seed=0))
        worker.close()

        worker = Worker(cfg, _loop_config(tmp_path))
        worker.prepare = lambda m: m.to(torch.float64)
        fresh = torch.nn.Linear(3, 2)
        optimizer, scheduler = _sgd_run(fresh)
        prepared, state = worker.prepare_and_resume(fresh, optimizer, scheduler)
        worker.close()
    assert state.epoch == 1
    buffers = [(p, optimizer.state[p]["momentum_buffer"]) for p in prepared.parameters()]
    assert len(buffers) == 2
    assert all(p.dtype == torch.float64 and b.dtype == p.dtype and b.device == p.device for p, b in buffers)
