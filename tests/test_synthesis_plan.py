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


def test_balance_budget_resolves_to_fixed_quotas_for_online_and_offline_runs():
    from ioisray.config import ConfigError, load_config
    from ioisray.iois import IOIS, resolve_budget

    counts = np.array([30, 12, 3])
    for mode in ("online", "offline"):
        cfg = load_config(None, [f"synthesis.mode={mode}", "synthesis.budget=balance"])
        run_cfg, fixed = resolve_budget(cfg, counts)
        np.testing.assert_array_equal(fixed, [0, 18, 27])
        assert run_cfg.synthesis.budget == 45 and cfg.synthesis.budget == "balance"  # the asked-for config kept
        iois = IOIS(run_cfg, 3, pool=None, rank=1, fixed_quotas=fixed)
        iois.aas.update([30, 0, 0], [30, 12, 3])  # AAS would give class 1 and 2 the most; the balance stays
        for _ in range(2):
            np.testing.assert_array_equal(iois._quotas(), [0, 18, 27])
        assert iois.aas.last_quotas == [0, 18, 27]
        plan = plan_epoch(iois._quotas(), epoch=1, run_seed=0, chunk_size=8)
        assert np.bincount(np.concatenate([c.labels for c in plan]), minlength=3).tolist() == [0, 18, 27]
    capped, fixed = resolve_budget(load_config(None, ["synthesis.mode=online", "synthesis.budget=balance",
                                                      "synthesis.max_budget=20"]), counts)
    assert capped.synthesis.budget == 20 and fixed.tolist() == [0, 8, 12]
    # An integer budget is left as it is; a split that is balanced already has nothing to balance.
    plain = load_config(None, ["synthesis.mode=online", "synthesis.budget=64"])
    assert resolve_budget(plain, counts) == (plain, None)
    with pytest.raises(ConfigError, match="synthesis.budget=balance: every class .* has 9 images already"):
        resolve_budget(load_config(None, ["synthesis.mode=online", "synthesis.budget=balance"]), [9, 9, 9])


def test_filtered_images_are_summed_per_class_over_the_epochs_chunks():
    from ioisray.iois import IOIS
    from ioisray.synthesis.tally import filtered_per_class

    timings = [{"filtered": [0, 2, 1]}, None, {"filtered": [1, 0, 3]}, {"images": 4}]  # one chunk not made yet
    assert filtered_per_class(timings) == [1, 2, 4]
    assert filtered_per_class([{"filtered": None}, None]) is None  # no judge (the live one before epoch 1)
    line = IOIS.summary({"quotas": [3, 4], "synthetic_per_class": [2, 2], "filtered_per_class": [1, 2],
                         "seconds_to_first_synthetic": 1.0, "seconds_to_first_batch": 0.5})
    assert "received 4 (filtered out 3)" in line
    assert "filtered" not in IOIS.summary({"quotas": [3, 4], "synthetic_per_class": [3, 4],
                                           "seconds_to_first_synthetic": 1.0, "seconds_to_first_batch": 0.5})


def test_the_live_classifier_is_sent_to_the_actors_when_it_filters_even_unguided():
    from ioisray.config import ConfigError, load_config
    from ioisray.iois import live_filter

    online = ["synthesis.mode=online", "synthesis.budget=8"]
    assert live_filter(load_config(None, online + ["synthesis.filter=0.5", "synthesis.guidance=false"]))
    assert not live_filter(load_config(None, online))
    assert not live_filter(load_config(None, online + ["synthesis.filter=0.5", "synthesis.filter_model=/runs/judge"]))
    with pytest.raises(ConfigError, match="synthesis.filter with synthesis.mode=offline needs synthesis.filter_model"):
        load_config(None, ["synthesis.mode=offline", "synthesis.budget=8", "synthesis.filter=0.5"])
    with pytest.raises(ConfigError, match="synthesis.filter_model judges for synthesis.filter, which is 0"):
        load_config(None, online + ["synthesis.filter_model=/runs/judge"])
    with pytest.raises(ConfigError, match="synthesis.filter"):
        load_config(None, online + ["synthesis.filter=1.0"])
