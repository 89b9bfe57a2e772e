"""The epoch plan and the worker-side tally: plain Python, no Ray."""
import math
import time

import numpy as np
import pytest
import torch

from ioisray.synthesis.plan import SEED_EPOCH, chunk_sizes, image_seeds, num_chunks, plan_epoch
from ioisray.synthesis.tally import SyntheticTally


@pytest.mark.parametrize("seed", range(20))
def test_plan_holds_exactly_the_quotas_in_a_fixed_number_of_chunks(seed):
    rng = np.random.default_rng(seed)
    quotas = rng.integers(0, 40, size=int(rng.integers(1, 9)))
    chunk_size = int(rng.integers(1, 17))
    chunks = plan_epoch(quotas, epoch=3, run_seed=seed, chunk_size=chunk_size)
    labels = np.concatenate([c.labels for c in chunks]) if chunks else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.bincount(labels, minlength=len(quotas)), quotas)
    assert len(chunks) == num_chunks(int(quotas.sum()), chunk_size)
    assert [len(c) for c in chunks] == chunk_sizes(int(quotas.sum()), chunk_size)
    sizes = [len(c) for c in chunks]
    assert max(sizes, default=0) <= chunk_size
    assert len(sizes) <= math.ceil(quotas.sum() / chunk_size) + 3  # the ramp adds at most three chunks
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_the_first_chunks_are_small_so_synthetic_images_arrive_early():
    assert chunk_sizes(512, 32) == [4, 8, 16] + [32] * 15 + [4]
    assert chunk_sizes(48, 6) == [1, 3] + [6] * 7 + [2]
    assert chunk_sizes(20, 1) == [1] * 20 and chunk_sizes(3, 32) == [3] and chunk_sizes(0, 8) == []
    for budget in range(0, 70):
        assert sum(chunk_sizes(budget, 16)) == budget


def test_chunk_sizes_depend_on_the_budget_only_and_seeds_identify_images():
    a = plan_epoch([90, 5, 5], epoch=0, run_seed=1, chunk_size=16)
    b = plan_epoch([10, 10, 80], epoch=1, run_seed=1, chunk_size=16)
    assert [len(c) for c in a] == [len(c) for c in b] == [2, 4, 8, 16, 16, 16, 16, 16, 6]
    seeds_a = np.concatenate([c.seeds for c in a])
    seeds_b = np.concatenate([c.seeds for c in b])
    assert len(set(seeds_a) | set(seeds_b)) == 200  # unique across epochs
    np.testing.assert_array_equal(seeds_b, image_seeds(1, 1, 100))
    assert seeds_b[0] == 1 * 1_000_000_000 + 1 * SEED_EPOCH
    # The same (run, epoch, quotas) gives the same plan; another epoch shuffles differently.
    again = plan_epoch([90, 5, 5], epoch=0, run_seed=1, chunk_size=16)
    assert all((x.labels == y.labels).all() and (x.seeds == y.seeds).all() for x, y in zip(a, again))
    other = plan_epoch([90, 5, 5], epoch=2, run_seed=1, chunk_size=16)
    assert not all((x.labels == y.labels).all() for x, y in zip(a, other))


def test_with_several_actors_the_last_chunks_shrink_so_they_finish_together():
    sizes = chunk_sizes(512, 32, actors=4)
    assert sum(sizes) == 512 and sizes[:4] == [4, 8, 16, 32]
    tail = sizes[sizes.index(32) + sizes.count(32):]
    assert tail == sorted(tail, reverse=True) and tail[-2] <= 32 // 8  # shrinking to chunk_size/8
    left = 512 - np.cumsum([0] + sizes[:-1])  # before each chunk, what is left
    assert all(s <= max(4, math.ceil(r / 8)) for s, r in zip(tail, left[-len(tail):]))
    assert chunk_sizes(512, 32, actors=1) == chunk_sizes(512, 32)  # one actor: no tail
    for budget in range(0, 90):
        assert sum(chunk_sizes(budget, 8, actors=3)) == budget
    plan = plan_epoch([30, 30], epoch=0, run_seed=0, chunk_size=8, actors=3)
    assert [len(c) for c in plan] == chunk_sizes(60, 8, 3)


def test_tally_counts_synthetic_rows_and_refuses_another_epochs_images():
    tally = SyntheticTally(num_classes=3, plan_epoch=2, keep_per_class=2, started_at=0.0)

    def batch(labels, synthetic, plan_epochs):
        n = len(labels)
        return {"image": torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 2, 3),
                "label": torch.tensor(labels), "synthetic": torch.tensor(synthetic, dtype=torch.int8),
                "plan_epoch": torch.tensor(plan_epochs)}

    def slow(batches):  # the real batch arrives, then the synthetic one 0.05 s later
        for b in batches:
            yield b
            time.sleep(0.05)

    seen = list(tally.watch(slow([batch([0, 1, 1], [0, 0, 0], [-1, -1, -1]),
                                  batch([1, 2, 2, 2], [1, 0, 1, 1], [2, -1, 2, 2])])))
    assert len(seen) == 2
    np.testing.assert_array_equal(tally.per_class, [0, 1, 2])
    assert 0 < tally.seconds_to_first_batch < tally.seconds_to_first  # the real batch came first
    examples = tally.examples()
    assert [len(e) for e in examples] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="plan epoch 1"):
        list(tally.watch([batch([0], [1], [1])]))
