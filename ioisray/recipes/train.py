"""Recipe: train a classifier on imbalanced data with Ray Train: every baseline of the harness, and
IOIS with its ablations when `synthesis.mode` is on (the IOIS steps themselves are in ioisray/iois.py).

    setup    driver: load the data, split it (train / val / test, fixed by seed), make Ray datasets;
             for IOIS, the diffusion model (pretrained first if the config names none) and the
             synthesis pool, whose chunks stream into the training dataset
    train    workers: `train_loop_per_worker`, one epoch at a time; validation picks the best epoch;
             a checkpoint every epoch; the test split is evaluated once, at the end, with the best weights
    save     driver: metrics.json and metrics.md (atomic), next to the resolved config.yaml; with IOIS
             the real-vs-synthetic figure, and with `baseline` the per-class change figure
    cleanup  driver: stop the synthesis pool and the Ray it started
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ioisray import iois, report as figures, storage
from ioisray.aas import AASState
from ioisray.atomic import atomic_save_safetensors, atomic_write_text
from ioisray.checkpoint import TrainingState
from ioisray.config import Config, ConfigError, RunFinishedError, load_config, save_config
from ioisray.data import provenance
from ioisray.engine import predict, train_one_epoch
from ioisray.losses import create_loss
from ioisray.metrics import classification_metrics, format_table
from ioisray.models import create_classifier
from ioisray.precision import grad_scaler, resolve_precision
from ioisray.recipes.common import (check_resumable, cpu_batches, cpu_state_dict, epoch_generator, fit,
                                    new_checkpoint_dir,
                                    open_run, report, restore_or_start, setup_data, tensorboard_location, unwrap,
                                    worker_setup)
from ioisray.synthesis.tally import SyntheticTally
from ioisray.transforms import TrainTransform

RESULTS_FILE = "results.json"
BEST_MODEL_FILE = "best_model.safetensors"
SYNTHETIC_EXAMPLES_FILE = "synthetic_examples.safetensors"
EXAMPLES_PER_CLASS = 8


# ---------------------------------------------------------------------------------------------
# Worker side (Ray-free except for the few `ray.train` calls)


def build_optimizer(cfg: Config, model: torch.nn.Module):
    t = cfg.train
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay, nesterov=t.momentum > 0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # Stepped once per epoch.
    main_epochs = max(1, t.epochs - t.warmup_epochs)
    if t.schedule == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=main_epochs)
    elif t.schedule == "multistep":
        main = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[m - t.warmup_epochs for m in t.milestones], gamma=t.gamma)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    if t.warmup_epochs == 0:
        return opt, main
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=t.warmup_epochs)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[t.warmup_epochs])


def build_loss(cfg: Config, class_counts) -> torch.nn.Module:
    m = cfg.method
    drw_epoch = m.drw_epoch if m.drw_epoch is not None else int(0.8 * cfg.train.epochs)
    return create_loss(m.loss, class_counts, focal_gamma=m.focal_gamma, cb_beta=m.cb_beta,
                       weight_power=m.weight_power, ldam_max_margin=m.ldam_max_margin,
                       ldam_scale=m.ldam_scale, drw_epoch=drw_epoch, drw_beta=m.drw_beta,
                       la_tau=m.la_tau)


def build_classifier(cfg: Config, num_classes: int, *, pretrained: bool = True) -> torch.nn.Module:
    """The timm classifier of this config; LDAM-DRW gets the cosine head its margins assume.
    `pretrained=False` builds the architecture only, without reading `model.weights`: for copies
    whose weights come from elsewhere (the synthesis actors' guide, a finished run's best model),
    possibly on a node that does not have that file."""
    model_cfg = cfg.model if pretrained else cfg.model.model_copy(update={"weights": None})
    return create_classifier(model_cfg, num_classes, cosine_head=cfg.method.loss == "ldam_drw")


def _tb_scalars(writer, prefix: str, metrics: dict, epoch: int) -> None:
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(f"{prefix}/{k}", v, epoch)
        elif isinstance(v, dict) and k == "per_class_accuracy":
            for name, acc in v.items():
                if not math.isnan(acc):
                    writer.add_scalar(f"{prefix}_per_class/{name}", acc, epoch)


def _tb_synthesis(writer, class_names, quotas, synthesis: dict, tally: SyntheticTally, epoch: int) -> None:
    from torchvision.utils import make_grid

    for name, q in zip(class_names, quotas):
        writer.add_scalar(f"synthesis_quota/{name}", int(q), epoch)
    for a, rate in enumerate(synthesis["images_per_second_per_actor"]):
        writer.add_scalar(f"synthesis/images_per_second_actor_{a}", rate, epoch)
    for key in ("seconds_to_first_synthetic", "seconds_to_first_batch", "seconds_to_first_chunk"):
        if synthesis.get(key) is not None:
            writer.add_scalar(f"synthesis/{key}", synthesis[key], epoch)
    writer.add_scalar("synthesis/generation_seconds", synthesis["generation_seconds"], epoch)
    rows = [t for t in tally.examples() if len(t)]
    if rows:  # one row per class that received images, up to EXAMPLES_PER_CLASS each
        k = max(len(t) for t in rows)
        padded = [torch.cat([t, torch.zeros((k - len(t), *t.shape[1:]), dtype=t.dtype)]) for t in rows]
        grid = make_grid(torch.cat(padded).permute(0, 3, 1, 2), nrow=k, padding=1)
        writer.add_image("synthesis/images_per_class", grid, epoch)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    class_names: list[str] = loop_config["class_names"]
    counts = loop_config["class_counts"]
    num_classes = len(class_names)
    rank, world, device = worker_setup(cfg)
    # First: Ray Data's split coordinator (an actor) then starts while the model is built.
    train_shard = ray.train.get_dataset_shard("train")

    # setup
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_classifier(cfg, num_classes)
    optimizer, scheduler = build_optimizer(cfg, model)
    loss_fn = build_loss(cfg, counts).to(device)
    state, resumed = restore_or_start(cfg, model, optimizer, scheduler)
    # AAS state: per-class accuracy on the training split of the last epoch (summed over workers).
    aas = AASState.from_dict(state.extra["aas"]) if resumed else AASState(num_classes)
    if resumed and rank == 0:
        print(f"[ioisray] resumed from epoch {state.epoch}", flush=True)
    precision = resolve_precision(cfg.train.precision, device)
    scaler = grad_scaler(device, precision)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    transform = TrainTransform(cfg.data.image_size, cfg.train.augment)
    batch_options = cpu_batches(device)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        events = storage.EventsDir(loop_config["tensorboard_dir"], loop_config["tensorboard_uri"])
        writer = SummaryWriter(events.path)

    pool = loop_config.get("synthesis_pool")  # None unless synthesis.mode is on
    tally = None
    n_train = sum(counts) + (cfg.synthesis.budget if pool else 0)
    batches_per_epoch = math.ceil(n_train / world / cfg.train.batch_size)
    if cfg.train.max_batches_per_epoch:
        batches_per_epoch = min(batches_per_epoch, cfg.train.max_batches_per_epoch)
    log_every = max(1, batches_per_epoch // 4)

    def log(i: int, loss: torch.Tensor) -> None:
        if rank == 0 and batches_per_epoch >= 20 and i % log_every == 0:  # .item() waits for the device
            print(f"[ioisray]   batch {i}/~{batches_per_epoch} loss {loss.item():.4f}", flush=True)

    # train
    for epoch in range(state.epoch, cfg.train.epochs):
        loss_fn.set_epoch(epoch)
        # Augmentation, mixup and shuffling replay on resume (class-balanced re-sampling draws
        # unseeded, see data/ray_dataset.py).
        gen = epoch_generator(cfg, rank, epoch)
        epoch_started = time.time()
        if rank == 0:  # this epoch's order of the real rows (see data/ray_dataset.py)
            ray.get(loop_config["epoch_counter"].set.remote(epoch))
        if pool is not None:  # IOIS steps 1-2: quotas from AAS, the pool starts this epoch's images
            plan_epoch, quotas = iois.begin_epoch(cfg, pool, aas, unwrap(model), epoch, rank)
            tally = SyntheticTally(num_classes, plan_epoch, EXAMPLES_PER_CLASS if rank == 0 else 0,
                                   epoch_started)
        shuffle = ({"local_shuffle_buffer_size": cfg.train.shuffle_buffer,
                    "local_shuffle_seed": int(gen.initial_seed() % 2**31)} if cfg.train.shuffle_buffer else {})
        batches = train_shard.iter_torch_batches(batch_size=cfg.train.batch_size, dtypes=None, **batch_options,
                                                 **shuffle)
        if tally is not None:
            batches = tally.watch(batches)
        stats = train_one_epoch(model, batches, loss_fn, optimizer, transform, num_classes, device,
                                mixup_alpha=cfg.method.mixup_alpha, generator=gen,
                                max_batches=cfg.train.max_batches_per_epoch, log=log, precision=precision,
                                scaler=scaler, channels_last=cfg.train.channels_last)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        aas.update(stats.correct, stats.total)  # the same all-reduced counts on every rank
        metrics: dict = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                         "lr": lr, "epoch_seconds": time.time() - epoch_started}
        synthesis = iois.end_epoch(pool, tally, rank) if pool is not None else None
        ckpt_dir = None
        if rank == 0:
            # Validation on rank 0 over the whole split (no image dropped), deterministic transform.
            y, p = predict(unwrap(model), ray.train.get_dataset_shard("val").iter_torch_batches(
                batch_size=cfg.train.batch_size * 2, dtypes=None, **batch_options), device, precision=precision)
            val = classification_metrics(y, p, class_names)
            train_pc = {n: float(a) for n, a in zip(class_names, stats.per_class_accuracy)}
            metrics.update({f"val_{k}": val[k] for k in ("balanced_accuracy", "macro_f1", "accuracy")})
            state.epoch = epoch + 1
            state.model, state.optimizer = cpu_state_dict(model), optimizer.state_dict()
            state.scheduler = scheduler.state_dict()
            state.extra["aas"] = aas.to_dict()
            state.extra.setdefault("history", []).append(
                {**{k: metrics[k] for k in ("epoch", "train_loss", "train_accuracy", "val_balanced_accuracy",
                                            "val_macro_f1", "lr", "epoch_seconds")},
                 "train_per_class_accuracy": train_pc,
                 **({"quotas": [int(q) for q in quotas], **synthesis} if synthesis else {})})
            if val["balanced_accuracy"] > state.best_metric:  # model selection on validation only
                state.best_metric, state.best_epoch, state.best_val = val["balanced_accuracy"], epoch, val
                state.best_model = state.model
            _tb_scalars(writer, "train", {"loss": stats.loss, "accuracy": stats.accuracy, "lr": lr,
                                          "per_class_accuracy": train_pc}, epoch)
            _tb_scalars(writer, "val", val, epoch)
            if synthesis:
                _tb_synthesis(writer, class_names, quotas, synthesis, tally, epoch)
            writer.flush()
            events.sync()
            print(f"[ioisray] epoch {epoch + 1}/{cfg.train.epochs} loss {stats.loss:.4f} "
                  f"train_acc {stats.accuracy:.4f} val_bacc {val['balanced_accuracy']:.4f} "
                  f"val_f1 {val['macro_f1']:.4f} lr {lr:.3g} ({metrics['epoch_seconds']:.1f}s)", flush=True)
            if synthesis:
                print(f"[ioisray]   synthesis: quotas {[int(q) for q in quotas]}, received "
                      f"{sum(synthesis['synthetic_per_class'])}, first after "
                      f"{synthesis['seconds_to_first_synthetic'] or float('nan'):.1f}s (first batch "
                      f"{synthesis['seconds_to_first_batch'] or float('nan'):.1f}s, first chunk made "
                      f"{synthesis['seconds_to_first_chunk']:.1f}s), all generated after "
                      f"{synthesis['generation_seconds']:.1f}s, images/s per actor "
                      f"{[round(r, 1) for r in synthesis['images_per_second_per_actor']]}", flush=True)
            ckpt_dir = new_checkpoint_dir()
            state.save(ckpt_dir)
        report(metrics, ckpt_dir)

    # The test split, once, with the weights chosen on validation. The results travel in a last
    # checkpoint (with the final state), so they reach the driver's storage from any node, and a
    # resumed finished run reports them again instead of touching the test split a second time.
    ckpt_dir = None
    if rank == 0:
        if "results" not in state.extra:
            if state.best_model is None:
                raise RuntimeError("no epoch finished: nothing to evaluate")
            test = None  # a search trial never sees the test split (its best config is run afterwards)
            if loop_config.get("evaluate_test", True):
                unwrap(model).load_state_dict(state.best_model)
                y, p = predict(unwrap(model), ray.train.get_dataset_shard("test").iter_torch_batches(
                    batch_size=cfg.train.batch_size * 2, dtypes=None, **batch_options), device,
                    precision=precision)
                test = classification_metrics(y, p, class_names)
            history = state.extra.get("history", [])
            state.extra["results"] = {"best_epoch": state.best_epoch, "val": state.best_val, "test": test,
                                      "history": history,
                                      "mean_epoch_seconds": float(np.mean([h["epoch_seconds"]
                                                                           for h in history]))}
            if test is not None:
                _tb_scalars(writer, "test", test, state.best_epoch)
        writer.close()
        events.sync()
        ckpt_dir = new_checkpoint_dir()
        state.save(ckpt_dir)
        atomic_write_text(Path(ckpt_dir) / RESULTS_FILE, json.dumps(state.extra["results"]))
        if tally is not None:  # the last epoch's synthetic images, for the real-vs-synthetic figure
            atomic_save_safetensors({f"class_{c}": t for c, t in enumerate(tally.examples()) if len(t)},
                                    Path(ckpt_dir) / SYNTHETIC_EXAMPLES_FILE)
    report({"done": True}, ckpt_dir)


# ---------------------------------------------------------------------------------------------
# Driver side


def train(cfg: Config, *, evaluate_test: bool = True, callbacks: tuple = ()) -> dict:
    """Run the recipe; returns {"best_epoch", "val", "test", "run_dir", ...}.

    `evaluate_test=False` (search trials) leaves the test split untouched: "test" is None.
    `callbacks`: Ray Train callbacks for the run (e.g. the one that reports epochs to Ray Tune).
    """
    from ioisray.data.ray_dataset import prestart_read_workers, start_epoch_counter, to_ray_dataset

    run_dir = open_run(cfg)
    if (run_dir / "metrics.json").exists():
        raise RunFinishedError(f"{run_dir} already holds a finished run (metrics.json); its test split "
                               f"was used once already. Choose another name=...")
    check_resumable(cfg, run_dir)
    t0 = time.perf_counter()
    ds, splits = setup_data(cfg)
    if len(splits["val"]) == 0:
        raise ConfigError("data.val_fraction: the validation split is empty, and the best epoch is chosen "
                          "on validation; use a fraction > 0")
    # Fail here, naming the key, rather than inside the Ray workers after start-up.
    build_classifier(cfg, ds.num_classes)
    if cfg.baseline and not storage.is_uri(cfg.baseline) and not Path(cfg.baseline).expanduser().exists():
        raise ConfigError(f"baseline: {cfg.baseline} does not exist")
    # What the run needs first: its diffusion model and its baseline (made here if missing).
    split_ids = {k: provenance.split_id(provenance.image_keys(ds, v, provenance.data_folder(cfg.data)))
                 for k, v in splits.items()}
    if cfg.baseline and (finished := baseline_run(cfg, train_if_missing=False)):
        check_same_test_split(finished, split_ids["test"])  # before a diffusion model may be pretrained
    model_dir = diffusion_model(cfg, ds, splits) if iois.is_on(cfg) else None
    baseline = baseline_run(cfg) if cfg.baseline else None
    if baseline:
        check_same_test_split(baseline, split_ids["test"])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    storage.push(run_dir, cfg.run_location)
    train_ds = ds.subset(splits["train"])
    counts = train_ds.class_counts()
    datasets = lambda handles: {  # noqa: E731 - built once Ray is up
        "train": iois.training_dataset(cfg, train_ds.images, train_ds.labels, handles.get("synthesis_pool"),
                                       cfg.ray.num_workers, handles["epoch_counter"]),
        "val": to_ray_dataset(ds.images[splits["val"]], ds.labels[splits["val"]]),
        "test": to_ray_dataset(ds.images[splits["test"]], ds.labels[splits["test"]]),
    }

    @contextlib.contextmanager
    def services():
        import ray

        handles = {"epoch_counter": start_epoch_counter()}
        if model_dir:
            # The stream's read workers start while the actors load the model. Only in the Ray ioisray
            # starts, which keeps idle workers (a cluster's may reap them first), and not in-process,
            # where the driver starts the reads in its own runtime environment.
            if not cfg.ray.address and cfg.ray.num_workers > 0:
                prestart_read_workers(iois.read_concurrency(cfg), modules=("ioisray.synthesis.pool",))
            handles["synthesis_pool"] = iois.start_synthesis(cfg, model_dir, ds.num_classes,
                                                             functools.partial(build_classifier, cfg, ds.num_classes,
                                                                               pretrained=False))
        try:
            yield handles
        finally:
            if model_dir:
                ray.get(handles["synthesis_pool"].shutdown.remote())
            for handle in handles.values():
                ray.kill(handle)

    loop_config = {"config": cfg.model_dump(mode="json"), "class_names": ds.class_names,
                   "class_counts": counts.tolist(), "evaluate_test": evaluate_test, **tensorboard_location(cfg)}
    result = fit(cfg, train_loop_per_worker, loop_config, datasets, services=services,
                 callbacks=callbacks)

    figures_made = []
    with result.checkpoint.as_directory() as d:
        out = json.loads((Path(d) / RESULTS_FILE).read_text())
        # The selected weights, next to the metrics they earned (safetensors: safe to share and load).
        atomic_save_safetensors(TrainingState.load(d).best_model, run_dir / BEST_MODEL_FILE)
        if (Path(d) / SYNTHETIC_EXAMPLES_FILE).is_file():
            figures_made.append(_real_vs_synthetic(Path(d) / SYNTHETIC_EXAMPLES_FILE, train_ds, run_dir))
    out.update({"class_names": ds.class_names, "splits": {k: len(v) for k, v in splits.items()}, "split_ids": split_ids,
                "train_class_counts": counts.tolist(), "run_dir": cfg.run_location,
                "seconds": time.perf_counter() - t0})
    if model_dir:
        out["diffusion_model_dir"] = model_dir
    save_results(out, run_dir)
    if baseline:
        figures_made.append(figures.per_class_change_from_runs(run_dir, baseline))
    out["figures"] = [storage.join(cfg.run_location, f.relative_to(run_dir).as_posix()) for f in figures_made]
    storage.push(run_dir, cfg.run_location)
    return out


def baseline_run(cfg: Config, train_if_missing: bool = True) -> Optional[Path]:
    """The finished run `cfg.baseline` names; an experiment config is trained first (same output_dir,
    seed and Ray settings) unless its run has finished already (or, with `train_if_missing` false,
    None is returned)."""
    if storage.is_uri(cfg.baseline):
        cfg = cfg.model_copy(update={"baseline": storage.fetch_dir(cfg.baseline)})
    path = Path(cfg.baseline).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        if not (path / "metrics.json").is_file():
            raise ConfigError(f"baseline: {path} is not a finished run folder (no metrics.json)")
        return path
    if not path.is_file():
        raise ConfigError(f"baseline: config file not found: {path}")
    base = load_config(path, [f"output_dir={cfg.output_dir}", f"seed={cfg.seed}"])
    base = base.model_copy(update={"ray": cfg.ray, "data": cfg.data})
    if base.baseline or base.synthesis.mode != "none":
        raise ConfigError(f"baseline: {path} must be a plain baseline (no synthesis, no baseline of its own)")
    if not (open_run(base) / "metrics.json").is_file():
        if not train_if_missing:
            return None
        print(f"[ioisray] baseline {base.name}: training it first ({base.run_dir})", flush=True)
        train(base)
    return base.run_dir


def check_same_test_split(baseline_dir: Path, test_split_id: str) -> None:
    """The per-class change figure compares test accuracies: only over the same test images. (A
    baseline finished before split ids were recorded is not checked.)"""
    recorded = json.loads((Path(baseline_dir) / "metrics.json").read_text()).get("split_ids", {}).get("test")
    if recorded is not None and recorded != test_split_id:
        raise ConfigError(f"baseline: {baseline_dir} was tested on another test split than this run's (another "
                          f"seed, data.split_seed or split setting), so the two cannot be compared class by class; "
                          f"give a baseline run of this split, or remove that folder to train it again")


def diffusion_model(cfg: Config, ds, splits: dict) -> str:
    """The diffusion model IOIS samples from: `diffusion.model_dir`, or, when that is not set, the one
    pretrained for this data, training split, preset and size, which is pretrained here first if
    missing. Refused if it was trained on any of this run's validation or test images."""
    from ioisray.models.diffusion import load_noise_scheduler, load_unet
    from ioisray.recipes.pretrain_diffusion import UNET_DIR, diffusion_image_size, pretrain_diffusion

    folder = provenance.data_folder(cfg.data)
    train_keys = provenance.image_keys(ds, splits["train"], folder)
    if cfg.diffusion.model_dir:
        model_dir = cfg.diffusion.model_dir
        try:
            load_unet(model_dir, ds.num_classes)
            load_noise_scheduler(model_dir)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
    else:
        size = diffusion_image_size(cfg)
        # Only what shapes the diffusion model goes into its run, so IOIS runs that differ in method,
        # synthesis, training settings or training seed share one model; another split gets its own.
        d = cfg.diffusion
        tag = (("_v" if d.prediction_type == "v_prediction" else "")
               + ("_cosine" if d.beta_schedule == "squaredcos_cap_v2" else ""))
        pre = Config(name=f"diffusion_{cfg.data.name}_{d.preset}_{size}px{tag}_split{provenance.split_id(train_keys)}",
                     seed=cfg.split_seed, output_dir=cfg.output_dir, data=cfg.data, diffusion=cfg.diffusion,
                     pretrain=cfg.pretrain, ray=cfg.ray)
        # Named by its final location (a URI on a cluster), so that actors on any node can load it.
        model_dir = storage.join(pre.run_location, UNET_DIR)
        if storage.exists(model_dir):
            print(f"[ioisray] diffusion model: {model_dir}", flush=True)
        else:
            print(f"[ioisray] diffusion.model_dir is not set: pretraining one first ({pre.run_location})",
                  flush=True)
            pretrain_diffusion(pre)
    problem = provenance.check_record(storage.fetch_dir(model_dir), train_keys,
                                      provenance.image_keys(ds, np.concatenate([splits["val"], splits["test"]]), folder))
    if problem and problem.startswith("warning: "):
        print(f"[ioisray] {problem}", flush=True)
    elif problem:
        raise ConfigError(
            f"diffusion.model_dir: {problem} (split seed {cfg.split_seed}), so its samples would leak them into "
            f"training. Use a model pretrained on this split (leave diffusion.model_dir unset to pretrain one), or "
            f"keep the model's split with data.split_seed")
    return model_dir


def _real_vs_synthetic(examples_file: Path, train_ds, run_dir: Path) -> Path:
    from safetensors.numpy import load_file

    synthetic = load_file(str(examples_file))
    k = EXAMPLES_PER_CLASS
    rng = np.random.default_rng(0)
    real = [train_ds.images[rng.permutation(np.flatnonzero(train_ds.labels == c))[:k]]
            for c in range(len(train_ds.class_names))]
    fake = [synthetic.get(f"class_{c}", np.zeros((0,), np.uint8)) for c in range(len(train_ds.class_names))]
    return figures.real_vs_synthetic(train_ds.class_names, real, fake, run_dir / figures.REAL_VS_SYNTHETIC_PNG)


def save_results(results: dict, run_dir: Path) -> None:
    """metrics.md (the table the CLI prints) and metrics.json, both written atomically."""
    splits = {f"val (epoch {results['best_epoch'] + 1})": results["val"]}
    if results.get("test") is not None:
        splits["test"] = results["test"]
    table = format_table(splits, results["class_names"])
    atomic_write_text(run_dir / "metrics.md", table + "\n")
    atomic_write_text(run_dir / "metrics.json", json.dumps(results, indent=2))
