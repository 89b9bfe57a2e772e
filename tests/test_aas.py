import math

import numpy as np
import pytest
import torch

from ioisray.aas import AASState, quotas, softmax_shares


def test_quotas_sum_exactly_and_stay_within_one_of_the_softmax_share():
    rng = np.random.default_rng(0)
    for case in range(500):
        num_classes = int(rng.integers(1, 12))
        budget = int(rng.choice([0, 1, int(rng.integers(0, 5000))]))
        temperature = float(rng.choice([0.05, 0.5, 1.0, 3.0]))
        acc = rng.uniform(0, 1, num_classes)
        if case % 5 == 0:  # exact ties exercise the tie-break
            acc[:] = acc[0]
        q = quotas(acc, budget, temperature)
        assert q.dtype == np.int64 and q.shape == (num_classes,)
        assert q.sum() == budget and (q >= 0).all()
        share = softmax_shares(acc, temperature)
        assert np.all(np.abs(q - budget * share) < 1)


def test_softmax_shares_match_formula():
    acc = [0.9, 0.5, 0.1]
    e = np.exp([(1 - a) / 2.0 for a in acc])
    np.testing.assert_allclose(softmax_shares(acc, 2.0), e / e.sum())


def test_worse_classes_get_at_least_as_many():
    rng = np.random.default_rng(1)
    for _ in range(100):
        acc = rng.uniform(0, 1, 6)
        q = quotas(acc, int(rng.integers(0, 3000)), float(rng.uniform(0.1, 3)))
        order = np.argsort(acc)  # ascending accuracy -> non-increasing quota
        assert np.all(np.diff(q[order]) <= 0)


def test_large_temperature_tends_to_uniform():
    acc = [0.0, 0.3, 1.0, 0.95]
    spread = [np.ptp(quotas(acc, 4000, t)) for t in (0.5, 5.0, 1e6)]
    assert spread[0] > spread[1] > spread[2] and spread[2] <= 1
    assert quotas(acc, 4000, 1e6).tolist() == [1000] * 4


def test_uniform_before_first_epoch_and_deterministic_ties():
    assert quotas(None, 10, num_classes=3).tolist() == [4, 3, 3]  # leftover goes to lower index
    assert quotas([0.5] * 3, 10).tolist() == [4, 3, 3]
    with pytest.raises(ValueError, match="num_classes"):
        quotas(None, 10)


def test_floor_is_respected_and_rest_follows_softmax():
    acc = [1.0, 1.0, 0.0]
    q = quotas(acc, 100, 0.01, floor=5)
    assert q.tolist() == [5, 5, 90]
    q = quotas(acc, 15, 1.0, floor=5)
    assert q.tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="aas.floor"):
        quotas(acc, 14, floor=5)
    with pytest.raises(ValueError, match="aas.floor"):
        quotas(acc, 14, floor=-1)


@pytest.mark.parametrize("t", [0, -1.0, math.inf, math.nan])
def test_bad_temperature_rejected(t):
    with pytest.raises(ValueError, match="aas.temperature"):
        quotas([0.5, 0.5], 10, t)


@pytest.mark.parametrize("n", [-1, 2.5, "10", True])
def test_bad_budget_rejected(n):
    with pytest.raises(ValueError, match="synthesis.budget"):
        quotas([0.5, 0.5], n)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_bad_accuracy_names_the_class(bad):
    with pytest.raises(ValueError, match="class 2"):
        quotas([0.5, 0.5, bad], 10)


def test_state_update_keeps_unseen_classes_and_round_trips(tmp_path):
    state = AASState(num_classes=3)
    assert state.quotas(9).tolist() == [3, 3, 3] and state.last_quotas == [3, 3, 3]
    state.update(correct=[8, 0, 0], total=[10, 4, 0])
    assert state.accuracy == [0.8, 0.0, 0.5]  # empty class: 0.5 when it has no previous accuracy
    state.update(correct=[1, 1, 0], total=[1, 2, 0])
    assert state.accuracy == [1.0, 0.5, 0.5]  # empty class keeps its previous value
    state.quotas(100)
    with pytest.raises(ValueError):
        state.update(correct=[1, 1], total=[1, 1])

    torch.save({"aas": state.to_dict()}, tmp_path / "ckpt.pt")
    loaded = AASState.from_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["aas"])
    assert loaded == state
    assert AASState.from_dict(AASState(num_classes=2).to_dict()) == AASState(num_classes=2)


def test_balance_quotas_fill_every_class_up_to_the_largest_within_the_cap():
    from ioisray.aas import balance_quotas

    counts = [50, 10, 5, 50]
    np.testing.assert_array_equal(balance_quotas(counts), [0, 40, 45, 0])
    np.testing.assert_array_equal(balance_quotas(counts, cap=85), [0, 40, 45, 0])  # the cap not reached
    # Over the cap: the cap split in proportion to the deficits, 40:45 of 60 is 28.2:31.8.
    capped = balance_quotas(counts, cap=60)
    np.testing.assert_array_equal(capped, [0, 28, 32, 0])
    assert capped.dtype == np.int64 and capped.sum() == 60
    np.testing.assert_array_equal(balance_quotas([7, 7]), [0, 0])
    with pytest.raises(ValueError, match="class counts"):
        balance_quotas([5, -1])
