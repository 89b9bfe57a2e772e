"""What Ray prints to a user's console: by default only warnings, errors and ioisray's own lines; Ray's
INFO lines come back with `ioisray --verbose` (IOISRAY_VERBOSE=1; Ray Data's progress bars stay off,
ioisray prints its own progress), and Ray's log files keep everything."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

RAY_DATA_LOGGING = "RAY_DATA_LOGGING_CONFIG"
QUIET_RAY_DATA = """version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
filters:
  notices: {"()": ioisray.recipes.console.DropNotices}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: WARNING, filters: [notices]}
loggers:
  ray.data: {level: DEBUG, handlers: [file, console], propagate: false}
"""


def verbose() -> bool:
    """Whether the user asked for Ray's own lines (`ioisray --verbose` sets IOISRAY_VERBOSE=1 for every
    process of the run)."""
    return os.environ.get("IOISRAY_VERBOSE") == "1"


class DropNotices(logging.Filter):
    """Ray Data's warning that progress bars are off (ioisray turns them off, and prints its own progress)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def quiet_ray_data() -> None:
    """Ray Data's console handler at WARNING instead of INFO (one line per dataset execution), in this
    process and every process its Ray starts (Ray Data reads RAY_DATA_LOGGING_CONFIG when it is
    imported); its log file in the Ray session folder keeps everything."""
    digest = hashlib.sha1(QUIET_RAY_DATA.encode()).hexdigest()[:12]  # a new file when the text changes
    path = os.path.join(tempfile.gettempdir(), f"ioisray-ray-data-logging-{os.getuid()}-{digest}.yaml")
    if not os.path.exists(path):
        with open(path + f".{os.getpid()}", "w") as f:
            f.write(QUIET_RAY_DATA)
        os.replace(path + f".{os.getpid()}", path)
    os.environ.setdefault(RAY_DATA_LOGGING, path)
    # In every process: Ray's deprecation notices about its own internals (Ray Train's use of Ray Data),
    # and torch's notice that Ray Data hands it read-only arrays (zero-copy from Arrow; never written).
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,"
                                            "ignore:The given NumPy array is not writable:UserWarning")


# What the local raylet tells every driver while it starts worker processes on a small machine (a read
# task per synthetic chunk, the actors, the Train workers): normal for ioisray, alarming to a user.
RAYLET_NOTICES = ("PYTHON worker processes have been started",)


def drop_raylet_notices() -> None:
    """Filter the raylet notices above out of what Ray prints on this driver's console; every other
    line passes unchanged. The raylet's warnings reach the driver as error messages, which Ray's
    listener hands to `print_to_stdstream` (worker output reaches that function too)."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:  # another Ray: the notices show, nothing worse
        return
    original = ray_worker.print_to_stdstream
    if getattr(original, "drops_raylet_notices", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not any(n in line for n in RAYLET_NOTICES)]
            if not lines:
                return
            data = {**data, "lines": lines}
        original(data, ignore_prefix)

    print_to_stdstream.drops_raylet_notices = True
    ray_worker.print_to_stdstream = print_to_stdstream


def quiet_data_context() -> None:
    """No Ray Data progress bars (ioisray prints its own progress), and no per-execution lines unless
    `ioisray --verbose`."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = verbose()


def quiet_ray_train() -> None:
    """No INFO line per report from every worker (Ray Train logs them under its module's file name,
    outside the "ray.train" logger), unless `ioisray --verbose`."""
    if verbose():
        return
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray: its lines may show, nothing worse
        pass


class DropLines(logging.Filter):
    """Drops records whose message contains one of `parts`."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in str(record.msg) for p in self.parts)


# Tune's lines that contradict or repeat ioisray's own: the resume hint (ioisray resumes by rerunning the
# command), and timings of its own bookkeeping that a busy small machine always exceeds.
# "Stop signal received": ioisray says the search was interrupted, and how to resume it.
TUNE_NOTICES = {"ray.tune.tune": ("Resume experiment with", "Resume training with", "Stop signal received"),
                "ray.tune.utils.util": ("may be a performance bottleneck",),
                "ray.tune.execution.tune_controller": ("may be a performance bottleneck",)}


# Ray's notice, at every start of a local Ray, that token authentication is on (its default, which
# ioisray keeps: the private Ray's ports are on 127.0.0.1, which other users of the machine reach).
AUTH_NOTICES = {"ray._private.authentication.authentication_token_setup":
                ("Token authentication is enabled for this Ray cluster",)}


def _drop(notices: dict) -> None:
    for name, parts in notices.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLines) for f in logger.filters):
            logger.addFilter(DropLines(*parts))


def quiet_auth_notice() -> None:
    _drop(AUTH_NOTICES)


def quiet_tune() -> None:
    """Tune's console output down to its warnings that matter, unless `ioisray --verbose`: its legacy
    reporter at verbose=0 prints nothing (the new one prints a configuration box, a results path and a
    TensorBoard path under Ray's session folder that are not the run's), ioisray prints the trials'
    table, and TUNE_NOTICES are dropped. Ray's log files keep everything."""
    if verbose():
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    _drop(TUNE_NOTICES)


def say(run: str, message: str) -> None:
    """One console line of run `run`, tagged with its name: a job's baseline, diffusion pretraining and
    IOIS runs (and a search's trials) print alike, and the tag says whose line it is."""
    print(f"[{run}] {message}", flush=True)


def method_words(cfg) -> str:
    """What a run trains with, in words, for its announcement."""
    s, m = cfg.synthesis, cfg.method
    extra = [x for x in ("class-balanced sampling" if m.sampling == "class_balanced" else "",
                         f"mixup {m.mixup_alpha:g}" if m.mixup_alpha else "") if x]
    base = f"{m.loss}{' + ' + ', '.join(extra) if extra else ''}"
    if s.mode == "online":
        return (f"IOIS ({s.budget} synthetic images an epoch from {s.pool_size} synthesis "
                f"actor{'s' if s.pool_size > 1 else ''}{'' if cfg.aas.enabled else ', AAS off'}"
                f"{'' if s.guidance else ', unguided'}), {base}")
    if s.mode == "offline":
        return f"offline synthesis ({s.budget} synthetic images an epoch), {base}"
    return base
