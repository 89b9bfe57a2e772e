"""Run outputs on a filesystem URI: upload, download (checkpoints left to Ray Train), model fetch."""
import os
from pathlib import Path

import pytest

from ioisray import storage
from ioisray.config import Config
from ioisray.run import run_dir, run_location


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_push_and_pull_round_trip_without_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("IOISRAY_STAGING", str(tmp_path / "staging"))
    cfg = Config(name="r", output_dir=f"file://{tmp_path}/store/")
    assert run_location(cfg) == f"file://{tmp_path}/store/r"
    assert run_dir(cfg).parent.parent == tmp_path / "staging"  # a local copy, not the store itself
    run_dir(cfg).mkdir(parents=True)
    (run_dir(cfg) / "config.yaml").write_text("a: 1\n")
    (run_dir(cfg) / "tensorboard").mkdir()
    (run_dir(cfg) / "tensorboard" / "events.1").write_bytes(b"\x00" * 10)
    storage.push(run_dir(cfg), run_location(cfg))
    assert _tree(tmp_path / "store" / "r") == ["config.yaml", "tensorboard/events.1"]

    (tmp_path / "store" / "r" / "ray_train" / "checkpoint_0").mkdir(parents=True)
    (tmp_path / "store" / "r" / "ray_train" / "checkpoint_0" / "state.pt").write_bytes(b"big")
    (tmp_path / "store" / "r" / "metrics.json").write_text("{}")
    fresh = tmp_path / "other_machine"
    storage.pull(fresh, run_location(cfg))
    assert _tree(fresh) == ["config.yaml", "metrics.json", "tensorboard/events.1"]  # checkpoints stay put
    assert storage.exists(storage.join(run_location(cfg), "ray_train"))
    assert not storage.exists(storage.join(run_location(cfg), "nothing"))


def test_a_stale_staging_copy_cannot_make_a_run_look_finished(tmp_path, monkeypatch):
    # An earlier run of the same name finished, and its outputs were then removed from the store:
    # its staging copy on this machine must not make a new run of that name look finished.
    from ioisray.run import Run

    monkeypatch.setenv("IOISRAY_STAGING", str(tmp_path / "staging"))
    cfg = Config(name="r", output_dir=f"file://{tmp_path}/store/")
    (run_dir(cfg) / "checkpoints").mkdir(parents=True)
    (run_dir(cfg) / "metrics.json").write_text("{}")
    (run_dir(cfg) / "checkpoints" / "kept").write_text("not the staging copy's business")
    assert not Run(cfg).pull().finished
    assert _tree(run_dir(cfg)) == ["checkpoints/kept"]  # folders the staging copy skips are left alone
    (tmp_path / "store" / "r").mkdir(parents=True)
    (tmp_path / "store" / "r" / "metrics.json").write_text("{}")
    assert Run(cfg).pull().finished


def test_local_output_dir_is_used_in_place(tmp_path):
    cfg = Config(name="r", output_dir=str(tmp_path))
    assert run_dir(cfg) == tmp_path / "r" and run_location(cfg) == str(tmp_path / "r")
    storage.push(run_dir(cfg), run_location(cfg))  # nothing to do, nothing created
    assert not (tmp_path / "r").exists()


def test_fetch_dir_downloads_a_model_once_and_again_when_it_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("IOISRAY_STAGING", str(tmp_path / "staging"))
    model = tmp_path / "store" / "unet"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"width": 1}')
    uri = f"file://{model}"
    local = storage.fetch_dir(uri)
    assert (Path(local) / "config.json").read_text() == '{"width": 1}'
    copied = os.stat(Path(local) / "config.json").st_ino
    assert storage.fetch_dir(uri) == local  # unchanged: read from this node's copy, not downloaded again
    assert os.stat(Path(local) / "config.json").st_ino == copied

    (model / "config.json").write_text('{"width": 22}')  # the model written again at the same URI
    again = storage.fetch_dir(uri)
    assert again != local and (Path(again) / "config.json").read_text() == '{"width": 22}'
    assert not Path(local).exists()  # the copy of what was there before is removed
    # Same size, newer file: fetched again too.
    (model / "config.json").write_text('{"width": 33}')
    stat = os.stat(model / "config.json")
    os.utime(model / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert (Path(storage.fetch_dir(uri)) / "config.json").read_text() == '{"width": 33}'
    (model / "weights.bin").write_bytes(b"\0")  # a file added
    assert sorted(os.listdir(storage.fetch_dir(uri))) == ["config.json", "weights.bin"]
    assert storage.fetch_dir(str(tmp_path / "store")) == str(tmp_path / "store")  # local paths as they are


def test_events_dir_uploads_on_sync(tmp_path):
    events = storage.EventsDir(str(tmp_path / "unused"), f"file://{tmp_path}/store/tb")
    (tmp_path / "store").mkdir()
    with open(f"{events.path}/events.0", "w") as f:
        f.write("x")
    events.sync()
    assert (tmp_path / "store" / "tb" / "events.0").read_text() == "x"
    assert not (tmp_path / "unused").exists()
    assert storage.EventsDir(str(tmp_path / "tb"), None).path == str(tmp_path / "tb")


def test_unknown_filesystem_names_output_dir():
    with pytest.raises(ValueError, match="output_dir.*nosuchfs://bucket"):
        storage.exists("nosuchfs://bucket/run")
