"""The Ray Data adapter: every row once in order for evaluation, fresh balanced samples for training."""
import json
import os

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def data(counts=(300, 40, 10)):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels)) % 256  # row id, to recognise rows
    images[:, 0, 0, 1] = np.arange(len(labels)) // 256
    return images, labels


def row_ids(rows):
    return rows["image"][:, 0, 0, 0].astype(int) + 256 * rows["image"][:, 0, 0, 1].astype(int)


def test_ordered_and_natural_yield_every_row_once(local_ray):
    from ioisray.data.ray_dataset import to_ray_dataset

    images, labels = data()
    ordered = to_ray_dataset(images, labels, sampling="ordered").take_batch(10_000)
    assert np.array_equal(row_ids(ordered), np.arange(len(labels)))
    assert np.array_equal(ordered["label"], labels)
    natural = to_ray_dataset(images, labels, sampling="natural", seed=0).take_batch(10_000)
    ids = row_ids(natural)
    assert sorted(ids) == list(range(len(labels))) and not np.array_equal(ids, np.arange(len(labels)))
    assert np.array_equal(natural["label"], labels[ids])  # labels travel with their images


def test_the_images_are_stored_in_blocks_and_a_read_fetches_only_the_blocks_holding_its_rows(local_ray):
    import dataclasses

    from ioisray.data.ray_dataset import gather_rows, put_arrays

    images, labels = data()  # 350 rows of 48 bytes
    stored = put_arrays(images, labels, block_bytes=48 * 100)
    assert stored.rows_per_block == 100 and len(stored.blocks) == 4  # rows 0-99, ..., 300-349
    assert np.array_equal(row_ids({"image": ray.get(stored.blocks[3])}), np.arange(300, 350))

    @ray.remote(num_cpus=0)
    def never_fetched():
        raise RuntimeError("a block outside the rows asked for was fetched")

    # Every block but rows 100-199 replaced by one whose fetch raises: reading those rows never touches them.
    only_second = dataclasses.replace(stored, blocks=tuple(b if i == 1 else never_fetched.remote()
                                                           for i, b in enumerate(stored.blocks)))
    ids = np.array([150, 101, 199, 150])
    rows = gather_rows(only_second, ids, "ordered")
    assert np.array_equal(row_ids(rows), ids) and np.array_equal(rows["label"], labels[ids])
    with pytest.raises(ray.exceptions.RayTaskError, match="outside the rows"):
        gather_rows(only_second, np.array([150, 20]), "ordered")
    rows = gather_rows(stored, np.array([349, 0, 250, 99, 100]), "ordered")  # across blocks, in the order asked
    assert np.array_equal(row_ids(rows), [349, 0, 250, 99, 100])


def test_datasets_read_every_row_once_from_many_blocks(local_ray, monkeypatch):
    from ioisray.data import ray_dataset

    monkeypatch.setattr(ray_dataset, "STORED_BLOCK_BYTES", 48 * 64)  # 6 blocks
    images, labels = data()
    ordered = ray_dataset.to_ray_dataset(images, labels, sampling="ordered").take_batch(10_000)
    assert np.array_equal(row_ids(ordered), np.arange(len(labels))) and np.array_equal(ordered["label"], labels)
    natural = ray_dataset.to_ray_dataset(images, labels, sampling="natural", seed=0).take_batch(10_000)
    assert sorted(row_ids(natural)) == list(range(len(labels)))
    assert np.array_equal(natural["label"], labels[row_ids(natural)])


def test_an_ordered_dataset_keeps_its_order_behind_a_slow_block(local_ray):
    # Evaluation writes row i of its predictions for row i of the split: blocks must leave in order.
    from ioisray.data.ray_dataset import to_ray_dataset

    def _slow_first_block(batch):  # nested: pickled by value (this module is not importable in workers)
        import time

        if (batch["image"][:, 0, 0, :2] == 0).all(axis=1).any():  # row 0's id: the first block finishes last
            time.sleep(1.0)
        return batch

    images, labels = data((600, 200, 100))  # 3 blocks
    ds = to_ray_dataset(images, labels, sampling="ordered").map_batches(_slow_first_block, batch_format="numpy")
    assert np.array_equal(row_ids(ds.take_batch(10_000)), np.arange(len(labels)))
    # Ray Data's default hands blocks on as they finish (without the option, the slow block came last when
    # this ran alone; under load the tasks may run one at a time and keep the order by chance), and a
    # training dataset keeps that default: order costs waiting for the slowest block.
    assert ds.context.execution_options.preserve_order
    assert not to_ray_dataset(images, labels, sampling="natural").context.execution_options.preserve_order


def test_natural_order_is_new_each_epoch_and_replays_for_the_same_epoch(local_ray):
    from ioisray.data.ray_dataset import start_epoch_counter, to_ray_dataset

    images, labels = data()
    counter = start_epoch_counter()
    ds = to_ray_dataset(images, labels, sampling="natural", seed=0, epoch_counter=counter)

    def order(epoch):
        ray.get(counter.set.remote(epoch))
        return row_ids(ds.take_batch(10_000))

    first, second, first_again = order(0), order(1), order(0)
    assert sorted(second) == list(range(len(labels)))  # still every row once
    assert not np.array_equal(first, second)
    assert np.array_equal(first, first_again)  # a resumed run reads its epoch's order again
    ray.kill(counter)


def test_class_balanced_draws_classes_evenly_and_anew_each_epoch(local_ray):
    from ioisray.data.ray_dataset import to_ray_dataset

    images, labels = data(counts=(3000, 400, 100))  # large enough that atol=0.06 is 7 sigma (unseeded draws)
    ds = to_ray_dataset(images, labels, sampling="class_balanced")
    first, second = ds.take_batch(10_000), ds.take_batch(10_000)
    assert len(first["label"]) == len(labels)
    share = np.bincount(first["label"], minlength=3) / len(labels)
    assert np.allclose(share, 1 / 3, atol=0.06)  # natural shares are 0.86 / 0.11 / 0.03
    assert np.array_equal(first["label"], labels[row_ids(first)])
    assert not np.array_equal(row_ids(first), row_ids(second))  # a fresh sample per execution


def test_ray_trains_dataset_reads_run_on_the_prestarted_workers(local_ray, tmp_path):
    # They do only if the prestarted workers have the runtime environment Ray Train gives those reads.
    # The same run checks that a dataset Train does not split (validation, test) reaches rank 0 in order.
    import ray.train
    from ray.train.torch import TorchTrainer

    from ioisray.data.ray_dataset import keep_order, prestart_read_workers
    from ioisray.recipes.launch import train_data_config

    def reader_pid(batch):  # nested: pickled by value (this test module is not importable in workers)
        return {"pid": np.full(len(batch["id"]), os.getpid())}

    out = tmp_path / "pids.json"

    def train_loop(_):
        shard = ray.train.get_dataset_shard("train")
        out.write_text(json.dumps([int(p) for b in shard.iter_batches(batch_size=None) for p in b["pid"]]))
        val = ray.train.get_dataset_shard("val")
        order.write_text(json.dumps([int(i) for b in val.iter_batches(batch_size=None) for i in b["id"]]))

    def slow_first(batch):
        if 0 in batch["id"]:
            import time

            time.sleep(1.0)
        return batch

    prestarted = set(ray.get(prestart_read_workers(2)))
    assert len(prestarted) == 2
    order = tmp_path / "order.json"
    datasets = {"train": ray.data.range(2, override_num_blocks=2).map_batches(reader_pid, num_cpus=0, batch_size=None),
                "val": ray.data.range(30, override_num_blocks=3).map_batches(slow_first, num_cpus=0, batch_size=None)}
    keep_order(datasets["val"])  # as to_ray_dataset marks its `ordered` (evaluation) datasets
    TorchTrainer(train_loop, datasets=datasets, scaling_config=ray.train.ScalingConfig(num_workers=1),
                 dataset_config=train_data_config(datasets, ("train",)),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="prestart")).fit()
    pids = json.loads(out.read_text())
    assert len(pids) == 2 and set(pids) <= prestarted, (pids, prestarted)
    assert json.loads(order.read_text()) == list(range(30))  # (under load this may hold by chance; this cannot:)
    config = train_data_config(datasets, ("train",))
    assert config._resolve_execution_options("val").preserve_order
    assert not config._resolve_execution_options("train").preserve_order


def test_diffusion_pretraining_reads_a_new_order_each_epoch(local_ray):
    from types import SimpleNamespace

    from ioisray.data.ray_dataset import epoch_counter_service, set_epoch
    from ioisray.recipes.pretrain_diffusion import pretraining_datasets

    images, labels = data()
    with epoch_counter_service() as handles:
        split = SimpleNamespace(images=images, labels=labels)  # the training split's arrays
        ds = pretraining_datasets(SimpleNamespace(seed=0), split, handles)["train"]

        def order(epoch):
            set_epoch(handles["epoch_counter"], epoch)
            return row_ids(ds.take_batch(10_000))

        first, second = order(0), order(1)
    assert sorted(first) == sorted(second) == list(range(len(labels)))
    assert not np.array_equal(first, second)
