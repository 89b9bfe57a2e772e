import pickle

import pytest
import torch

from ioisray.atomic import atomic_write_text
from ioisray.checkpoint import FINAL, MANIFEST, STATE_FILE, CheckpointError, CheckpointStore, TrainingState
from ioisray.config import Config
from ioisray.models import create_classifier
from ioisray.training import build_optimizer


def small_state(epoch):
    return TrainingState(epoch=epoch, model={"w": torch.full((3,), float(epoch))}, optimizer={}, scheduler={})


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
    with pytest.raises(CheckpointError, match="is not a training state"):
        TrainingState.load(tmp_path)


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        TrainingState.load(tmp_path)
    torch.save({"epoch": 1, "surprise": 2}, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match="surprise"):
        TrainingState.load(tmp_path)
    (tmp_path / STATE_FILE).write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match=f"{STATE_FILE} is not a training state"):
        TrainingState.load(tmp_path)


def test_failed_write_keeps_the_previous_file_whole(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # fails mid-write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_store_keeps_the_newest_and_resumes_past_a_corrupt_one(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    for epoch in (1, 2, 3):
        store.save(small_state(epoch), files={"note.txt": f"epoch {epoch}".encode()})
    assert store.names() == ["epoch_00002", "epoch_00003"]  # older ones pruned
    assert store.read("epoch_00003", "note.txt") == b"epoch 3"
    # The newest is truncated (a full disk, a bad copy): the run resumes from the one before, saying why.
    state_file = tmp_path / "checkpoints" / "epoch_00003" / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])
    said = []
    name, state = store.latest(log=said.append)
    assert (name, state.epoch) == ("epoch_00002", 2) and torch.equal(state.model["w"], torch.full((3,), 2.0))
    assert "epoch_00003" in said[0] and "checksum" in said[0]
    with pytest.raises(CheckpointError, match="checksum"):
        store.load("epoch_00003")


def test_an_interrupted_checkpoint_is_never_used_and_is_cleaned_up(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(small_state(1))
    partial = tmp_path / "checkpoints" / "epoch_00002"  # killed before its manifest was written
    partial.mkdir()
    (partial / STATE_FILE).write_bytes(small_state(2).to_bytes())
    assert store.names() == ["epoch_00001"] and store.latest(log=lambda m: None)[0] == "epoch_00001"
    said = []
    assert store.remove_partial(log=said.append) == ["epoch_00002"] and not partial.exists()
    assert "epoch_00002" in said[0]


def test_a_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    from ioisray import storage

    store = CheckpointStore(tmp_path / "checkpoints")
    real_write = storage.write_bytes

    def disk_full(location, data):
        if location.endswith(MANIFEST):
            raise OSError(28, "No space left on device")
        real_write(location, data)

    monkeypatch.setattr(storage, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save(small_state(1))
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_the_final_checkpoint_comes_first(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(small_state(5))
    store.save(small_state(5), files={"results.json": b"{}"}, name=FINAL)
    assert store.latest()[0] == FINAL and store.names() == ["epoch_00005"]


def test_a_full_disk_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch, capsys):
    import errno
    import os

    from ioisray.atomic import atomic_write_text
    from ioisray.cli import _one_line

    target = tmp_path / "metrics.json"
    atomic_write_text(target, "before")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write_text(target, "after")
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert target.read_text() == "before" and list(tmp_path.iterdir()) == [target]  # no temporary file left
    assert _one_line(e.value) == 1
    err = capsys.readouterr().err
    assert f"No space left on device: {target}" in err and "rerun the same command to resume" in err
