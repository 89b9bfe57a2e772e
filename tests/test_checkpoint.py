import pickle

import pytest
import torch

from ioisray.atomic import atomic_write_text
from ioisray.checkpoint import STATE_FILE, TrainingState
from ioisray.config import Config
from ioisray.models import create_classifier
from ioisray.recipes.train import build_optimizer


def _trained_state(tmp_path):
    cfg = Config.model_validate({"train": {"epochs": 4, "schedule": "multistep", "milestones": [2]}})
    model = create_classifier(cfg.model, 3)
    opt, sched = build_optimizer(cfg, model)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    sched.step()
    return cfg, model, opt, sched, TrainingState(
        epoch=1, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
        best_model=model.state_dict(), best_metric=0.5, best_epoch=0, best_val={"balanced_accuracy": 0.5},
        seed=3, extra={"aas": {"accuracy": [0.1, 0.9, 0.5]}})


def test_round_trip_restores_model_optimizer_scheduler_and_extra(tmp_path):
    cfg, model, opt, sched, state = _trained_state(tmp_path)
    state.save(tmp_path)
    loaded = TrainingState.load(tmp_path)
    model2 = create_classifier(cfg.model, 3)
    opt2, sched2 = build_optimizer(cfg, model2)
    model2.load_state_dict(loaded.model)
    opt2.load_state_dict(loaded.optimizer)
    sched2.load_state_dict(loaded.scheduler)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    # momentum buffers survive, and the schedule continues where it stopped
    k = next(iter(opt.state))
    k2 = next(iter(opt2.state))
    assert torch.equal(opt.state[k]["momentum_buffer"], opt2.state[k2]["momentum_buffer"])
    assert sched2.last_epoch == sched.last_epoch == 1
    assert (loaded.epoch, loaded.best_epoch, loaded.seed) == (1, 0, 3)
    assert loaded.extra == {"aas": {"accuracy": [0.1, 0.9, 0.5]}}


def test_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / STATE_FILE).write_bytes(pickle.dumps({"epoch": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        TrainingState.load(tmp_path)


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        TrainingState.load(tmp_path)
    torch.save({"epoch": 1, "surprise": 2}, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match="surprise"):
        TrainingState.load(tmp_path)


def test_failed_write_keeps_the_previous_file_whole(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # fails mid-write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind
