"""Where a run's outputs live: a local folder (the default) or any pyarrow filesystem URI
(`s3://bucket/prefix`, `gs://...`, `hdfs://...`, `file:///mnt/nfs/...`), set by `output_dir`.

With a URI the driver writes into a local staging folder (`run.run_dir`) and uploads it
(`push`); Ray Train writes its checkpoints straight to the URI; the rank-0 worker, which may sit on
another node, uploads its TensorBoard events every epoch. A run restarted on another machine first
downloads the small files (`pull`), so resuming and "already finished" checks see them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

RAY_TRAIN = "ray_train"  # Ray Train's own records inside a run
CHECKPOINTS = "checkpoints"  # the run's checkpoints (ioisray/checkpoint.py)
SNAPSHOTS = "snapshots"  # a pretraining run's models along the way (recipes/pretrain_diffusion.py)
LARGE = (RAY_TRAIN, CHECKPOINTS, SNAPSHOTS)  # folders that never go through the staging copy


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def staging_dir(output_dir: str) -> Path:
    """The local copy of a URI output_dir: under $IOISRAY_STAGING (default ~/.cache/ioisray/staging)."""
    root = Path(os.environ.get("IOISRAY_STAGING", "~/.cache/ioisray/staging")).expanduser()
    return root / _key(output_dir.rstrip("/"))


def _key(uri: str) -> str:
    """A short, stable folder name for a URI."""
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if not is_uri(uri):  # a local path: the same calls work on it
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(uri)))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"output_dir: {uri!r} is not a filesystem URI pyarrow can open: {e}") from None


def read_bytes(location: str) -> bytes:
    """A file's bytes, from a local path or a URI (FileNotFoundError if it is not there)."""
    fs, path = _resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write a file at a local path (atomically: temp file, then rename) or a URI (one object put)."""
    if not is_uri(location):
        from ioisray.atomic import atomic_write_bytes

        atomic_write_bytes(location, data)
        return
    fs, path = _resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_dir(location: str) -> list[str]:
    """Names directly under a folder (empty if it does not exist)."""
    fs, path = _resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))


def delete(location: str) -> None:
    """Remove a file or a folder with everything in it; nothing if it is not there."""
    fs, path = _resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def exists(uri: str) -> bool:
    fs, path = _resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder's files to `uri` (same relative paths; files already there are replaced)."""
    if not Path(local_dir).is_dir():
        return
    fs, path = _resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _files(uri: str) -> tuple[pafs.FileSystem, dict]:
    """The filesystem of `uri` and its files below it: {relative path: FileInfo} (empty if it is not there)."""
    fs, path = _resolve(uri)
    infos = ([] if fs.get_file_info(path).type == pafs.FileType.NotFound
             else fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    return fs, {info.path[len(path):].lstrip("/"): info for info in infos if info.type == pafs.FileType.File}


def download(uri: str, local_dir: str | os.PathLike, skip: tuple[str, ...] = LARGE, mirror: bool = False,
             listed: tuple | None = None) -> None:
    """Copy the files under `uri` into `local_dir`, leaving out the top-level folders in `skip`. With
    `mirror`, files of `local_dir` (outside `skip`) that `uri` does not have are removed. `listed`: the
    (filesystem, files) of `_files(uri)`, when the caller has listed them already."""
    fs, files = listed or _files(uri)
    if mirror and Path(local_dir).is_dir():
        for local in Path(local_dir).rglob("*"):
            rel = local.relative_to(local_dir).as_posix()
            if local.is_file() and rel.split("/")[0] not in skip and rel not in files:
                local.unlink()
    for rel, info in files.items():
        if rel.split("/")[0] in skip:
            continue
        target = Path(local_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        with fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(target)  # a half-downloaded file never takes a real file's name


def pull(run_dir: Path, location: str, leave_out: tuple[str, ...] = ()) -> None:
    """Before a run starts or resumes: the staging folder made a copy of the run's small files at its
    URI, but for the top-level names in `leave_out` (files that only the URI's copy may hold: the run's
    lock), which are removed from the staging folder. The URI is the truth: a staging file it does not
    have (left by an earlier run of the same name whose outputs were since removed) is removed, so it
    cannot make the run look finished."""
    if is_uri(location):
        for name in leave_out:
            (Path(run_dir) / name).unlink(missing_ok=True)
        download(location, run_dir, skip=(*LARGE, *leave_out), mirror=True)


def push(run_dir: Path, location: str) -> None:
    """The staging folder's files to the run's URI (nothing to do for a local run)."""
    if is_uri(location):
        upload(run_dir, location)


class EventsDir:
    """Where a Ray Train worker writes TensorBoard events: the run folder itself, or, for a URI run (the
    worker may be on another node than the driver), a temporary folder uploaded by `sync()`, one per
    run (a resumed run writes into the same one) and removed by `close()`."""

    def __init__(self, local: str, uri: str | None):
        self.uri = uri
        if uri:
            self.path = os.path.join(tempfile.gettempdir(), f"ioisray-tb-{_key(uri)}")
            os.makedirs(self.path, exist_ok=True)
        else:
            self.path = local

    def sync(self) -> None:
        if self.uri:
            upload(self.path, self.uri)

    def close(self) -> None:
        if self.uri:
            self.sync()
            shutil.rmtree(self.path, ignore_errors=True)


def fetch_dir(path: str) -> str:
    """A local folder with the contents of `path`: itself when local, else a download cached on this
    node (for models named by URI, read on whichever node needs them). The cache is keyed by what is
    at the URI (every file's name, size and modification time), so a model written again at the same
    URI is fetched again; the copies of earlier contents are then removed."""
    if not is_uri(path):
        return path
    fs, files = _files(path)
    listing = "\n".join(f"{rel}\t{info.size}\t{info.mtime_ns}" for rel, info in sorted(files.items()))
    cache = staging_dir(path)
    local = cache / f"download-{hashlib.sha1(listing.encode()).hexdigest()[:16]}"
    if not local.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
        download(path, tmp, skip=(), listed=(fs, files))
        try:
            tmp.rename(local)  # whole or not at all; another process on this node may have won
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in cache.glob("download*"):
            if old != local:
                shutil.rmtree(old, ignore_errors=True)
    return str(local)
