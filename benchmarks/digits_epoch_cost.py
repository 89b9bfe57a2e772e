"""Where a main-job epoch's time goes on this machine, without the rest of the job: the pure compute
of one CE epoch on the embedded digits (no Ray), one SGD step per model and size, and iterating the
training rows through Ray Data in the driver and through a 2-way streaming split.

    python benchmarks/digits_epoch_cost.py [--threads 2]
"""
import argparse
import os
import threading
import time

import numpy as np
import timm
import torch

from ioisray.config import load_config
from ioisray.data.setup import setup_data
from ioisray.engine import numpy_batches, predict, train_one_epoch
from ioisray.models import build_classifier
from ioisray.training import build_loss, build_optimizer
from ioisray.transforms import TrainTransform


def compute(threads: int) -> None:
    for model, size in (("resnet18", 32), ("resnet10t", 16)):
        cfg = load_config("configs/digits_ce.yaml", [f"model.name={model}", f"data.image_size={size}"])
        ds, splits = setup_data(cfg)
        tr, va = ds.subset(splits["train"]), ds.subset(splits["val"])
        net = build_classifier(cfg, ds.num_classes)
        opt, _ = build_optimizer(cfg, net)
        loss = build_loss(cfg, tr.class_counts())
        tf = TrainTransform(cfg.data.image_size, cfg.train.augment)
        for e in range(3):
            t = time.perf_counter()
            train_one_epoch(net, numpy_batches(tr.images, tr.labels, cfg.train.batch_size, e), loss, opt, tf,
                            ds.num_classes, torch.device("cpu"))
            t1 = time.perf_counter()
            predict(net, numpy_batches(va.images, va.labels, 64), torch.device("cpu"))
            print(f"epoch {e} {model} at {size} px, {threads} threads: train {t1 - t:.2f} s ({len(tr.labels)} "
                  f"images), validation {time.perf_counter() - t1:.2f} s", flush=True)
    for model, size in (("resnet18", 32), ("resnet18", 16), ("resnet10t", 32), ("resnet10t", 16)):
        m = timm.create_model(model, num_classes=10)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(32, 3, size, size), torch.randint(0, 10, (32,))
        for i in range(13):
            if i == 3:
                t = time.perf_counter()
            out = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            out.backward()
            opt.step()
        print(f"SGD step, {model} at {size} px, batch 32: {(time.perf_counter() - t) / 10 * 1000:.0f} ms", flush=True)


def ray_data() -> None:
    import ray

    from ioisray.data.ray_dataset import start_epoch_counter, to_ray_dataset
    from ioisray.recipes.console import quiet_data_context

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    quiet_data_context()
    ds = to_ray_dataset(np.zeros((324, 16, 16, 3), np.uint8), np.arange(324) % 10, sampling="natural",
                        epoch_counter=start_epoch_counter())
    for e in range(3):
        t, first = time.perf_counter(), None
        for _ in ds.iter_torch_batches(batch_size=32, dtypes=None, device="cpu", prefetch_batches=2):
            first = first or time.perf_counter() - t
        print(f"Ray Data epoch {e} in the driver: first batch {first:.2f} s, all {time.perf_counter() - t:.2f} s")
    shards = ds.streaming_split(2, equal=True)
    for e in range(3):
        seconds = {}

        def read(k):
            t = time.perf_counter()
            for _ in shards[k].iter_torch_batches(batch_size=32, dtypes=None, device="cpu", prefetch_batches=2):
                pass
            seconds[k] = round(time.perf_counter() - t, 2)

        readers = [threading.Thread(target=read, args=(k,)) for k in range(2)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        print(f"Ray Data epoch {e}, 2-way streaming split: seconds per shard {seconds}")
    ray.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    compute(args.threads)
    ray_data()
