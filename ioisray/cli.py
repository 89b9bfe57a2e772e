"""`ioisray <command> <config.yaml> [key=value ...]`: parse, load the config, call a recipe.
`ioisray evaluate|predict <run folder> ...`: use a finished run's best model.
`ioisray config describe [PREFIX]`: what each config key is."""
from __future__ import annotations

import argparse
import errno
import sys

from ioisray import sigterm, supervisor
from ioisray.config import ConfigError, RunFinishedError, load_config

COMMANDS = {
    "train": "train a classifier (any baseline of the harness) with Ray Train",
    "pretrain-diffusion": "pretrain the class-conditional diffusion model on the training split",
    "sample": "sample a grid of images per class from diffusion.model_dir (optionally guided)",
    "tune": "Ray Tune search over the keys of tune.search_space (ASHA on validation); writes best_config.yaml",
    "benchmark": "methods x seeds of benchmark.* as Ray Tune trials; writes the results table and figures",
}
# Commands on a finished `ioisray train` run: they take its folder instead of a config.
RUN_COMMANDS = {
    "evaluate": "test a finished run's best model on any labelled dataset (data.* overrides); "
                "writes RUN/eval/<name>/",
    "predict": "predict the classes of unlabelled images with a finished run's best model; writes a CSV",
}


def _parser() -> argparse.ArgumentParser:
    from ioisray import __version__

    p = argparse.ArgumentParser(prog="ioisray", description="IOIS for imbalanced medical image "
                                "classification, on Ray.")
    p.add_argument("--version", action="version", version=f"ioisray {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's own INFO logs (worker reports, dataset executions) as well")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("config", help="experiment YAML, e.g. configs/digits.yaml")
        s.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. train.epochs=5 method.loss=ldam_drw")
        s.add_argument("--set", dest="set_", action="append", default=[], metavar="key=value",
                       help="another config override (may be repeated)")
        s.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit (`ioisray config describe` says what each key does)")
        if name == "benchmark":
            s.add_argument("--report-only", action="store_true",
                           help="start no run: write the table and figures of the runs that have finished")
        if name == "sample":
            s.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
            s.add_argument("--guide-run", help="a finished `ioisray train` run whose best classifier guides "
                           "sampling (sampler.guidance_scale, sampler.guidance_form)")
    _add_run_commands(sub)
    c = sub.add_parser("config", help="about the config's keys", description="about the config's keys")
    csub = c.add_subparsers(dest="config_command", required=True)
    d = csub.add_parser("describe", help="each config key: its type, default and what it does",
                        description="each config key: its type, default and what it does")
    d.add_argument("prefix", nargs="?", metavar="PREFIX",
                   help="only this key or section, e.g. synthesis or train.augment (default: every key)")
    return p


def _add_run_commands(sub) -> None:
    e = sub.add_parser("evaluate", help=RUN_COMMANDS["evaluate"], description=RUN_COMMANDS["evaluate"])
    e.add_argument("run", metavar="RUN", help="a finished `ioisray train` run folder, e.g. outputs/digits_ce")
    e.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data.* (the run's own data when none is given; images are resized to the run's "
                        "data.image_size), ray.use_gpu, train.batch_size; e.g. data.name=imagefolder data.root=/x")
    e.add_argument("--set", dest="set_", action="append", default=[], metavar="key=value",
                   help="another override (may be repeated)")
    e.add_argument("--split", choices=["test", "val", "train"],
                   help="only this split of the data (by its data.split_seed); default: every image")
    e.add_argument("--name", help="the results folder RUN/eval/NAME (default: the dataset's folder name, "
                                  "plus _SPLIT)")
    r = sub.add_parser("predict", help=RUN_COMMANDS["predict"], description=RUN_COMMANDS["predict"])
    r.add_argument("run", metavar="RUN", help="a finished `ioisray train` run folder")
    r.add_argument("images", nargs="+", metavar="IMAGES", help="image files, or folders searched recursively")
    r.add_argument("--out", help="the CSV to write (default RUN/predictions/<date>-<time>.csv)")


def _run_command(args) -> int:
    """evaluate / predict: no config file, no Ray."""
    from ioisray.recipes.evaluate import evaluate_run, predict_images

    if args.command == "predict":
        print(f"predictions: {predict_images(args.run, args.images, args.out)}")
        return 0
    out = evaluate_run(args.run, [*args.overrides, *args.set_], split=args.split, name=args.name)
    for warning in out["warnings"]:
        print(f"ioisray: warning: {warning}", file=sys.stderr)
    print(out["table"])
    print(f"\nresults: {out['out_dir']}/metrics.json  |  predictions: {out['out_dir']}/predictions.csv")
    print(f"figure: {out['out_dir']}/confusion_matrix.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may also follow options (`--per-class 4 sampler.steps=5`): argparse leaves them over.
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") or "=" not in r or args.command in ("predict", "config")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.command not in ("predict", "config"):
        args.overrides = [*args.overrides, *rest]
    if args.command == "config":
        return _describe(args.prefix)
    _quiet(args.verbose)
    before = sigterm.install()  # SIGTERM stops the command as Ctrl-C does
    try:
        if args.command in RUN_COMMANDS:
            return _run_command(args)
        cfg = load_config(args.config, [*args.overrides, *args.set_])
        if args.print_config:
            from ioisray.config import to_yaml

            print(to_yaml(cfg), end="")
            return 0
        return _config_command(args, cfg)
    except KeyboardInterrupt:
        print(f"ioisray: {_stopped_by()}interrupted; rerun the same command to resume", file=sys.stderr)
        supervisor.report(said=True)
        return _interrupted_code()
    except Exception as e:  # noqa: BLE001 - sorted into one line where the cause is known, re-raised otherwise
        return _one_line(e)
    finally:
        sigterm.uninstall(before)


def command() -> None:
    """The `ioisray` command (and `python -m ioisray`): main() in a child process that this one waits for
    (ioisray/supervisor.py), then exit with its code."""
    supervisor.run(main)


def _stopped_by() -> str:
    return "stopped by SIGTERM: " if sigterm.received() else ""


def _interrupted_code() -> int:
    """130 after Ctrl-C, 143 after SIGTERM: 128 + the signal, as a shell reports a process it ended."""
    return sigterm.EXIT_CODE if sigterm.received() else 130


def _describe(prefix: str | None) -> int:
    from ioisray.config.describe import describe, format_text

    try:
        keys = describe(prefix)
    except ConfigError as e:
        print(f"ioisray: error: {e}", file=sys.stderr)
        return 2
    print(format_text(keys), end="")
    return 0


def _config_command(args, cfg) -> int:
    from ioisray.run import run_dir, run_location

    if args.command == "train":
        from ioisray.recipes.train import train

        results = train(cfg)
        print((run_dir(cfg) / "metrics.md").read_text(), end="")  # the local (or staging) copy
        print(f"\nresults: {results['run_dir']}/metrics.json  |  tensorboard --logdir {results['run_dir']}/tensorboard")
        for figure in results["figures"]:
            print(f"figure: {figure}")
    elif args.command == "pretrain-diffusion":
        from ioisray.recipes.pretrain_diffusion import pretrain_diffusion

        pretrain_diffusion(cfg)
        print(f"\ndiffusion model: {run_location(cfg)}/unet  |  tensorboard --logdir {run_location(cfg)}/tensorboard")
    elif args.command == "sample":
        from ioisray.recipes.sample import sample_grid

        print(f"samples: {sample_grid(cfg, args.per_class, args.guide_run)}")
    elif args.command == "tune":
        from ioisray.recipes.tune import search

        out = search(cfg)
        print((run_dir(cfg) / "trials.md").read_text(), end="")
        print(f"\nbest {cfg.tune.metric} {out['best_value']:.4f} (validation): {out['best_params']}")
        print(f"best config: {out['best_config']}  |  ioisray train {out['best_config']}")
    elif args.command == "benchmark":
        from ioisray.recipes.benchmark import NothingFinishedError, benchmark

        try:
            out = benchmark(cfg, report_only=args.report_only)
        except NothingFinishedError as e:
            print(f"ioisray: error: {e}", file=sys.stderr)
            return 1
        print(out["table"], end="")
        print(f"\nresults: {out['run_dir']}/results.md")
        for figure in out["figures"]:
            print(f"figure: {figure}")
        if out["missing"]:
            print(f"ioisray: error: runs that did not finish: {', '.join(out['missing'])}", file=sys.stderr)
            return 1
    return 0


def _one_line(e: Exception) -> int:
    """Print what went wrong in one line and return the exit code; an error of unknown cause (a bug)
    is raised again, with its traceback."""
    from ioisray.recipes.launch import RayDidNotStart
    from ioisray.lock import RunLockedError
    from ioisray.run import RunInterrupted

    if isinstance(e, RayDidNotStart):  # a busy machine: says why and what to do
        print(f"ioisray: error: {e}", file=sys.stderr)
        return 1
    if isinstance(e, RunInterrupted):
        print(f"ioisray: {_stopped_by()}{e}", file=sys.stderr)
        supervisor.report(said=True)
        return _interrupted_code()
    if isinstance(e, (ConfigError, ValueError, FileNotFoundError, RunFinishedError, RunLockedError)):
        # Bad input: one clear line naming the file, key or option, no traceback.
        print(f"ioisray: error: {e}", file=sys.stderr)
        return 2
    cause = _root_cause(e)
    if isinstance(cause, OSError) and cause.errno is not None:  # a full disk, a permission, ...
        where = f": {cause.filename}" if cause.filename else ""
        kept = ("; what was saved before is intact (every file is written whole, then renamed): free some "
                "space and rerun the same command to resume" if cause.errno == errno.ENOSPC else "")
        print(f"ioisray: error: {cause.strerror or cause}{where}{kept}", file=sys.stderr)
        return 1
    if type(e).__module__.startswith("ray."):  # a failed Ray Train run: its workers' logs are above
        last = str(cause).strip().splitlines()[-1:] or [type(cause).__name__]
        print(f"ioisray: error: the run failed ({type(cause).__name__}: {last[0][:300]}); its workers' "
              f"logs are above, and rerunning the same command resumes it", file=sys.stderr)
        return 1
    raise e


def _root_cause(e: BaseException) -> BaseException:
    """The innermost error: Ray wraps a worker's exception (as .cause, or __cause__)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if isinstance(inner, BaseException):
            e = inner
        elif isinstance(getattr(e, "worker_failures", None), dict) and e.worker_failures:
            e = next(iter(e.worker_failures.values()))
        else:
            break
    return e


def _quiet(verbose: bool) -> None:
    """Ray's INFO lines (every worker's reports, every dataset execution) stay out of the console
    unless asked for; warnings and errors still show."""
    import logging
    import os

    if verbose:
        os.environ["IOISRAY_VERBOSE"] = "1"  # for the Ray the run starts (recipes/launch.ray_session)
    else:
        from ioisray.recipes.console import quiet_ray_data

        quiet_ray_data()  # before Ray Data is first imported
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
