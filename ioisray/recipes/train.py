"""Recipe: train a classifier on imbalanced data with Ray Train: every baseline of the harness, and
IOIS with its ablations when `synthesis.mode` is on (the algorithm itself is ioisray/iois.py).

    setup    driver: open the run (ioisray/run.py); load and split the data (fixed by seed); what the
             run needs first (recipes/prerequisites.py): the diffusion model and the baseline run;
             for IOIS the synthesis pool, whose chunks stream into the training dataset
    train    workers: `train_loop_per_worker`, one epoch at a time; validation picks the best epoch;
             a checkpoint every epoch; the test split is evaluated once, at the end, with the best weights
    save     driver: metrics.json, metrics.md and test_predictions.csv (atomic), next to config.yaml;
             with IOIS the real-vs-synthetic figure, and with `baseline` the per-class change figure
    cleanup  driver: stop the synthesis pool and the Ray it started, release the run
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ioisray import report as figures
from ioisray.checkpoint import FINAL, TrainingState
from ioisray.config import Config, ConfigError
from ioisray.data import provenance
from ioisray.data.setup import setup_data
from ioisray.engine import predict, train_one_epoch
from ioisray.iois import IOIS, is_on, resolve_budget
from ioisray.metrics import classification_metrics, format_table, predictions_csv
from ioisray.models import build_classifier, cpu_state_dict, unwrap
from ioisray.models.trained import BEST_MODEL_FILE
from ioisray.precision import grad_scaler, resolve_precision
from ioisray.recipes import prerequisites
from ioisray.recipes.console import method_words, say
from ioisray.recipes.launch import fit, local_ray_ends_with_the_command, local_ray_gone, ray_session
from ioisray.recipes.worker import Worker, locations
from ioisray.run import Run
from ioisray.training import COUNT_BASED_LOSSES, build_loss, build_optimizer, prior_counts
from ioisray.transforms import TrainTransform

RESULTS_FILE = "results.json"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
SYNTHETIC_EXAMPLES_FILE = "synthetic_examples.safetensors"


# ---------------------------------------------------------------------------------------------
# Worker side


def train_loop_per_worker(loop_config: dict) -> None:
    from ioisray.data.ray_dataset import set_epoch

    cfg = Config.model_validate(loop_config["config"])
    class_names: list[str] = loop_config["class_names"]
    counts, num_classes = loop_config["class_counts"], len(loop_config["class_names"])
    worker = Worker(cfg, loop_config)
    train_shard = worker.shard("train")  # first: Ray Data's split coordinator starts while the model is built
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_classifier(cfg, num_classes)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg, model)
    loss_fn = build_loss(cfg, counts).to(worker.device)
    pool = loop_config.get("synthesis_pool")  # None unless synthesis.mode is on
    iois = IOIS(cfg, num_classes, pool, worker.rank, loop_config.get("synthesis_quotas")) if pool is not None else None
    model, state = worker.prepare_and_resume(model, optimizer, scheduler)
    if iois is not None and state.epoch:
        iois.load_state_dict(state.extra)
    precision = resolve_precision(cfg.train.precision, worker.device)
    scaler = grad_scaler(worker.device, precision)
    transform = TrainTransform(cfg.data.image_size, cfg.train.augment)
    shuffle = ({"local_shuffle_buffer_size": cfg.train.shuffle_buffer} if cfg.train.shuffle_buffer else {})
    n_train = sum(counts) + (cfg.synthesis.budget if iois else 0)
    log = _progress(worker, math.ceil(n_train / worker.world / cfg.train.batch_size), cfg.train.max_batches_per_epoch)

    for epoch in worker.epochs(state, cfg.train.epochs):
        started = time.time()
        if worker.device.type == "cuda":  # gpu_memory_mb is this epoch's peak, not the process's
            torch.cuda.reset_peak_memory_stats(worker.device)
        if worker.rank == 0:  # this epoch's order of the real rows (see data/ray_dataset.py)
            set_epoch(loop_config["epoch_counter"], epoch)
        if iois is not None:  # IOIS steps 1-2: quotas from AAS; the pool starts this epoch's images
            iois.start_epoch(epoch, unwrap(model))
            if cfg.method.loss in COUNT_BASED_LOSSES:  # the loss's prior as method.prior_counts says
                loss_fn = build_loss(cfg, prior_counts(cfg, counts, iois.quotas)).to(worker.device)
        loss_fn.set_epoch(epoch)
        seed = {"local_shuffle_seed": int(worker.generator.initial_seed() % 2**31)} if shuffle else {}
        batches = worker.batches(train_shard, cfg.train.batch_size, **shuffle, **seed)
        stats = train_one_epoch(model, iois.wrap(batches) if iois else batches, loss_fn, optimizer, transform,
                                num_classes, worker.device, mixup_alpha=cfg.method.mixup_alpha,
                                generator=worker.generator, max_batches=cfg.train.max_batches_per_epoch, log=log,
                                precision=precision, scaler=scaler, channels_last=cfg.train.channels_last,
                                synthetic_weight=cfg.synthesis.loss_weight if iois else 1.0)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy, "lr": lr,
                   "epoch_seconds": time.time() - started,
                   **({"gpu_memory_mb": torch.cuda.max_memory_allocated(worker.device) / 2**20}
                      if worker.device.type == "cuda" else {})}
        synthesis = iois.end_epoch(stats) if iois is not None else None  # IOIS step 4: AAS update
        if worker.rank == 0:
            # Validation on rank 0 over the whole split (no image dropped), deterministic transform.
            y, p = predict(unwrap(model), worker.batches(worker.shard("val"), cfg.train.batch_size * 2),
                           worker.device)
            val = classification_metrics(y, p, class_names)
            metrics.update({f"val_{k}": val[k] for k in ("balanced_accuracy", "macro_f1", "accuracy")})
            _record_epoch(state, model, optimizer, scheduler, iois, metrics, stats, val, synthesis, class_names)
            _show_epoch(worker, cfg, class_names, metrics, stats, val, synthesis, iois)
        worker.end_epoch(metrics, state)

    # The test split, once, with the weights chosen on validation. The results go into the final
    # checkpoint, which the driver reads from any node; a finished run that resumes (the driver was
    # stopped after this) reports them again instead of touching the test split a second time.
    finished_now = worker.rank == 0 and "results" not in state.extra
    files = {}
    if finished_now:
        if state.best_model is None:
            raise RuntimeError("no epoch finished: nothing to evaluate")
        test = None
        if loop_config.get("evaluate_test", True):  # a search trial never sees the test split
            unwrap(model).load_state_dict(state.best_model)
            y, p = predict(unwrap(model), worker.batches(worker.shard("test"), cfg.train.batch_size * 2),
                           worker.device)
            test = classification_metrics(y, p, class_names)
            files[TEST_PREDICTIONS_FILE] = predictions_csv(loop_config["test_paths"], p, class_names, y).encode()
            figures.tensorboard_scalars(worker.writer, "test", test, state.best_epoch)
        history = state.extra.get("history", [])
        state.extra["results"] = {"best_epoch": state.best_epoch, "val": state.best_val, "test": test,
                                  "history": history,
                                  "mean_epoch_seconds": float(np.mean([h["epoch_seconds"] for h in history]))}
        files[RESULTS_FILE] = json.dumps(state.extra["results"]).encode()
        if iois is not None:  # the last epoch's synthetic images, for the real-vs-synthetic figure
            from safetensors.torch import save

            files[SYNTHETIC_EXAMPLES_FILE] = save({f"class_{c}": t.contiguous()
                                                   for c, t in enumerate(iois.examples()) if len(t)})
    worker.end_epoch({"done": True}, state if finished_now else None, files, name=FINAL)
    worker.close()


def _progress(worker: Worker, batches_per_epoch: int, max_batches):
    """Rank 0 prints the loss four times an epoch when epochs are long (20 batches or more)."""
    if max_batches:
        batches_per_epoch = min(batches_per_epoch, max_batches)
    every = max(1, batches_per_epoch // 4)

    def log(i: int, loss: torch.Tensor) -> None:
        if worker.rank == 0 and batches_per_epoch >= 20 and i % every == 0:  # .item() waits for the device
            say(worker.cfg.name, f"  batch {i}/~{batches_per_epoch} loss {loss.item():.4f}")

    return log


def _record_epoch(state: TrainingState, model, optimizer, scheduler, iois, metrics, stats, val, synthesis,
                  class_names) -> None:
    """The epoch into the training state rank 0 checkpoints; model selection on validation only."""
    state.epoch = metrics["epoch"] + 1
    state.model, state.optimizer = cpu_state_dict(model), optimizer.state_dict()
    state.scheduler = scheduler.state_dict()
    if iois is not None:
        state.extra.update(iois.state_dict())
    train_pc = {n: float(a) for n, a in zip(class_names, stats.per_class_accuracy)}
    state.extra.setdefault("history", []).append(
        {**{k: metrics[k] for k in ("epoch", "train_loss", "train_accuracy", "val_balanced_accuracy",
                                    "val_macro_f1", "lr", "epoch_seconds", "gpu_memory_mb") if k in metrics},
         "train_per_class_accuracy": train_pc, **(synthesis or {})})
    if val["balanced_accuracy"] > state.best_metric:
        state.best_metric, state.best_epoch, state.best_val = val["balanced_accuracy"], metrics["epoch"], val
        state.best_model = state.model


def _show_epoch(worker: Worker, cfg: Config, class_names, metrics, stats, val, synthesis, iois) -> None:
    """The epoch in TensorBoard and on the console (rank 0)."""
    train_pc = {n: float(a) for n, a in zip(class_names, stats.per_class_accuracy)}
    epoch = metrics["epoch"]
    figures.tensorboard_scalars(worker.writer, "train", {"loss": stats.loss, "accuracy": stats.accuracy,
                                                         "lr": metrics["lr"], "per_class_accuracy": train_pc}, epoch)
    figures.tensorboard_scalars(worker.writer, "val", val, epoch)
    if synthesis:
        figures.tensorboard_synthesis(worker.writer, class_names, synthesis, iois.examples(), epoch)
    say(cfg.name, f"epoch {epoch + 1}/{cfg.train.epochs} loss {stats.loss:.4f} train_acc {stats.accuracy:.4f} "
                  f"val_bacc {val['balanced_accuracy']:.4f} val_f1 {val['macro_f1']:.4f} lr {metrics['lr']:.3g} "
                  f"({metrics['epoch_seconds']:.1f}s)")
    if synthesis:
        say(cfg.name, f"  {IOIS.summary(synthesis)}")


# ---------------------------------------------------------------------------------------------
# Driver side


def train(cfg: Config, *, evaluate_test: bool = True, callbacks: tuple = (), lock_wait: float = 0.0) -> dict:
    """Run the recipe; returns {"best_epoch", "val", "test", "run_dir", ...}.

    `evaluate_test=False` (search trials) leaves the test split untouched: "test" is None.
    `callbacks`: Ray Train callbacks for the run (e.g. the one that reports epochs to Ray Tune).
    `lock_wait`: seconds to wait for another process's hold on the run to end or go stale (a retried trial).
    """
    with Run(cfg, lock_wait=lock_wait) as run:
        t0 = time.perf_counter()
        ds, splits = setup_data(cfg)
        if len(splits["val"]) == 0:
            raise ConfigError("data.val_fraction: the validation split is empty, and the best epoch is chosen "
                              "on validation; use a fraction > 0")
        build_classifier(cfg, ds.num_classes)  # fail here, naming the key, not inside the workers
        if cfg.model.pretrained or cfg.model.pretrained_file:
            say(cfg.name, f"model {cfg.model.name}: timm's pretrained weights "
                          f"({cfg.model.pretrained_file or 'timm cache'}), new {ds.num_classes}-class head")
        train_ds = ds.subset(splits["train"])
        counts = train_ds.class_counts()
        # What the run trains with: `run_cfg`, its synthesis budget a number (`balance` made into one from
        # the counts); the run's own config.yaml keeps what was asked for.
        run_cfg, fixed_quotas = resolve_budget(cfg, counts)
        split_ids = _check_inputs(cfg, ds, splits)
        run.start(epochs=cfg.train.epochs)
        cfg = run_cfg
        with ray_session(cfg, data_bytes=ds.images.nbytes):  # one Ray for the run and what it needs made first
            model_dir, baseline = _prerequisites(cfg, ds, splits, split_ids)
            loop_config = {"config": cfg.model_dump(mode="json"), "class_names": ds.class_names,
                           "class_counts": counts.tolist(), "evaluate_test": evaluate_test, **locations(run),
                           # test_predictions.csv names each image as `ioisray evaluate` does
                           "test_paths": provenance.relative_paths([ds.sources[i] for i in splits["test"]],
                                                                   provenance.data_folder(cfg.data))
                           if evaluate_test else [],
                           **({"synthesis_quotas": fixed_quotas.tolist()} if fixed_quotas is not None else {})}

            def datasets(handles: dict) -> dict:  # built once Ray is up
                from ioisray.data.ray_dataset import to_ray_dataset
                from ioisray.synthesis.stream import training_stream

                pool = handles.get("synthesis_pool")
                real = (train_ds.images, train_ds.labels)
                return {"train": (training_stream(cfg, *real, pool, cfg.ray.num_workers, handles["epoch_counter"])
                                  if pool is not None else
                                  to_ray_dataset(*real, sampling=cfg.method.sampling, seed=cfg.seed,
                                                 epoch_counter=handles["epoch_counter"])),
                        "val": to_ray_dataset(ds.images[splits["val"]], ds.labels[splits["val"]]),
                        "test": to_ray_dataset(ds.images[splits["test"]], ds.labels[splits["test"]])}

            where = (f"on {cfg.ray.num_workers} Ray Train worker{'s' if cfg.ray.num_workers > 1 else ''}"
                     if cfg.ray.num_workers else "in this process")
            say(cfg.name, f"training {cfg.model.name} with {method_words(cfg)}: {cfg.train.epochs} epochs on "
                          f"{len(splits['train'])} training images, {where} ({run.location})")
            try:
                fit(cfg, train_loop_per_worker, loop_config, datasets,
                    services=functools.partial(_services, cfg, model_dir, ds.num_classes), callbacks=callbacks)
            except KeyboardInterrupt:
                raise run.interrupted(cfg.train.epochs) from None
        if not run.checkpoints.complete(FINAL):  # Ray Train's own Ctrl-C handler ends fit() quietly
            raise run.interrupted(cfg.train.epochs)
        out = json.loads(run.checkpoints.read(FINAL, RESULTS_FILE))
        out.update({"class_names": ds.class_names, "splits": {k: len(v) for k, v in splits.items()},
                    "split_ids": split_ids, "train_class_counts": counts.tolist(), "run_dir": run.location,
                    # test_predictions.csv row i is test image i (read in order since 1956acf; runs without
                    # this mark may have it in another order, and are not paired image by image)
                    "test_predictions_in_split_order": True,
                    "seconds": time.perf_counter() - t0, **({"diffusion_model_dir": model_dir} if model_dir else {})})
        made = _save_outputs(run, out, train_ds, baseline)
        if baseline and out.get("test"):
            say(cfg.name, _comparison(cfg, out["test"], baseline))
        out["figures"] = [run.uri(f.relative_to(run.dir).as_posix()) for f in made]
        run.push()
        run.drop_checkpoints()
    return out


def _comparison(cfg: Config, test: dict, baseline) -> str:
    """The job's answer in one line: this run's test figures next to its baseline's."""
    base = json.loads((baseline / "metrics.json").read_text()).get("test") or {}
    return "; ".join(f"test {words}: {cfg.name} {test[key]:.3f}, baseline {baseline.name} {base[key]:.3f}"
                     for key, words in (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"))
                     if key in base)


def _check_inputs(cfg: Config, ds, splits: dict) -> dict:
    """What can be checked before Ray starts: a finished baseline's test split, a given diffusion model
    (its class count, and that it never saw this run's held-out images), the filter's judge. Returns the
    split ids."""

    split_ids = {k: provenance.split_id(provenance.image_keys(ds, v, provenance.data_folder(cfg.data)))
                 for k, v in splits.items()}
    if cfg.baseline and (finished := prerequisites.baseline_run(cfg)):
        prerequisites.check_same_test_split(finished, split_ids["test"])
    if is_on(cfg) and cfg.diffusion.model_dir:
        prerequisites.diffusion_model(cfg, ds, splits)
    if is_on(cfg) and cfg.synthesis.filter_model:
        prerequisites.check_filter_model(cfg, ds)
    return split_ids


def _prerequisites(cfg: Config, ds, splits: dict, split_ids: dict):
    """(diffusion model folder or None, finished baseline run or None), each made first if missing: the
    diffusion model pretrained on this training split, the baseline trained (and its test split checked)."""
    model_dir = prerequisites.diffusion_model(cfg, ds, splits) if is_on(cfg) else None
    baseline = prerequisites.baseline_run(cfg, train=train) if cfg.baseline else None
    if baseline:
        prerequisites.check_same_test_split(baseline, split_ids["test"])
    return model_dir, baseline


@contextlib.contextmanager
def _services(cfg: Config, model_dir, num_classes: int):
    """What the run's workers use besides their datasets: the epoch counter the read tasks ask, and for
    IOIS the synthesis pool. Stopped whatever happens."""
    from ioisray.data.ray_dataset import epoch_counter_service, prestart_read_workers
    from ioisray.synthesis.pool import SynthesisPool
    from ioisray.synthesis.stream import read_concurrency

    with epoch_counter_service() as handles:
        try:
            if model_dir:
                # The stream's read workers start while the actors load the model. Only in the Ray ioisray
                # starts, which keeps idle workers (a cluster's may reap them first), and not in-process,
                # where the driver starts the reads in its own runtime environment.
                if not cfg.ray.address and cfg.ray.num_workers > 0:
                    prestart_read_workers(read_concurrency(cfg.synthesis.pool_size),
                                          modules=("ioisray.synthesis.stream",))
                handles["synthesis_pool"] = SynthesisPool.for_run(cfg, model_dir, num_classes)
            yield handles
        finally:
            # Not when the run's own Ray is gone or ends with the command (after a SIGTERM): its actors
            # end with it, and a call to it could end this process before it says where the run stopped.
            if "synthesis_pool" in handles and not (local_ray_gone() or local_ray_ends_with_the_command()):
                handles["synthesis_pool"].shutdown()


def _save_outputs(run: Run, results: dict, train_ds, baseline) -> list[Path]:
    """The selected weights, the test predictions, metrics.md and (last) metrics.json, then the figures;
    returns the figures made."""
    from safetensors.numpy import load as load_numpy
    from safetensors.torch import save

    store = run.checkpoints
    files = {BEST_MODEL_FILE: save({k: v.contiguous() for k, v in store.load(FINAL).best_model.items()})}
    if results.get("test") is not None:
        files[TEST_PREDICTIONS_FILE] = store.read(FINAL, TEST_PREDICTIONS_FILE)
    splits = {f"val (epoch {results['best_epoch'] + 1})": results["val"],
              **({"test": results["test"]} if results.get("test") is not None else {})}
    made = []
    if SYNTHETIC_EXAMPLES_FILE in store.files(FINAL):
        made.append(_real_vs_synthetic(load_numpy(store.read(FINAL, SYNTHETIC_EXAMPLES_FILE)), train_ds, run.dir))
    run.finish(results, format_table(splits, results["class_names"]), files)
    if baseline:
        made.append(figures.per_class_change_from_runs(run.dir, baseline))
    return made


def _real_vs_synthetic(synthetic: dict, train_ds, run_dir: Path) -> Path:
    from ioisray.iois import EXAMPLES_PER_CLASS

    rng = np.random.default_rng(0)
    real = [train_ds.images[rng.permutation(np.flatnonzero(train_ds.labels == c))[:EXAMPLES_PER_CLASS]]
            for c in range(len(train_ds.class_names))]
    fake = [synthetic.get(f"class_{c}", np.zeros((0,), np.uint8)) for c in range(len(train_ds.class_names))]
    return figures.real_vs_synthetic(train_ds.class_names, real, fake, run_dir / figures.REAL_VS_SYNTHETIC_PNG)
