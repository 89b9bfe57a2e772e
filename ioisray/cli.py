"""`ioisray <command> <config.yaml> [key=value ...]`: parse, load the config, call a recipe."""
from __future__ import annotations

import argparse
import sys

from ioisray.config import ConfigError, RunFinishedError, load_config

COMMANDS = {
    "train": "train a classifier (any baseline of the harness) with Ray Train",
    "pretrain-diffusion": "pretrain the class-conditional diffusion model on the training split",
    "sample": "sample a grid of images per class from diffusion.model_dir (optionally guided)",
    "tune": "Ray Tune search over the keys of tune.search_space (ASHA on validation); writes best_config.yaml",
    "benchmark": "methods x seeds of benchmark.* as Ray Tune trials; writes the results table and figures",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ioisray", description="IOIS for imbalanced medical image "
                                "classification, on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("config", help="experiment YAML, e.g. configs/digits.yaml")
        s.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. train.epochs=5 method.loss=ldam_drw")
        s.add_argument("--set", dest="set_", action="append", default=[], metavar="key=value",
                       help="another config override (may be repeated)")
        s.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
        if name == "benchmark":
            s.add_argument("--report-only", action="store_true",
                           help="start no run: write the table and figures of the runs that have finished")
        if name == "sample":
            s.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
            s.add_argument("--guide-run", help="a finished `ioisray train` run whose best classifier guides "
                           "sampling (sampler.guidance_scale, sampler.guidance_form)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may also follow options (`--per-class 4 sampler.steps=5`): argparse leaves them over.
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *rest]
    try:
        cfg = load_config(args.config, [*args.overrides, *args.set_])
        if args.print_config:
            from ioisray.config import to_yaml

            print(to_yaml(cfg), end="")
            return 0
        if args.command == "train":
            from ioisray.recipes.train import train

            results = train(cfg)
            print((cfg.run_dir / "metrics.md").read_text(), end="")  # the local (or staging) copy
            print(f"\nresults: {results['run_dir']}/metrics.json  |  "
                  f"tensorboard --logdir {results['run_dir']}/tensorboard")
            for figure in results["figures"]:
                print(f"figure: {figure}")
        elif args.command == "pretrain-diffusion":
            from ioisray.recipes.pretrain_diffusion import pretrain_diffusion

            pretrain_diffusion(cfg)
            print(f"\ndiffusion model: {cfg.run_location}/unet  |  tensorboard --logdir {cfg.run_location}/tensorboard")
        elif args.command == "sample":
            from ioisray.recipes.sample import sample_grid

            print(f"samples: {sample_grid(cfg, args.per_class, args.guide_run)}")
        elif args.command == "tune":
            from ioisray.recipes.tune import search

            out = search(cfg)
            print((cfg.run_dir / "trials.md").read_text(), end="")
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
    except (ConfigError, ValueError, FileNotFoundError, RunFinishedError) as e:
        # Bad input: one clear line naming the file, key or option, no traceback.
        print(f"ioisray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
