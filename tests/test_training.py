"""IOIS composed with re-balancing: a count-based loss's prior is the epoch's real + synthetic counts."""
from pathlib import Path

import pytest
import torch

from ioisray.config import load_config
from ioisray.training import COUNT_BASED_LOSSES, build_loss, epoch_class_counts, prior_counts

ROOT = Path(__file__).resolve().parent.parent


def test_epoch_counts_add_the_epochs_synthetic_quota_to_the_real_counts():
    assert epoch_class_counts([90, 10, 5]).tolist() == [90, 10, 5]
    assert epoch_class_counts([90, 10, 5], [0, 30, 50]).tolist() == [90, 40, 55]


@pytest.mark.parametrize("loss", ["logit_adjusted", "balanced_softmax"])
def test_a_prior_from_balanced_epoch_counts_treats_the_classes_alike(loss):
    assert loss in COUNT_BASED_LOSSES
    cfg = load_config(ROOT / "configs/digits_ce.yaml", [f"method.loss={loss}"])
    logits, labels = torch.zeros(2, 2), torch.tensor([0, 1])

    def per_class(counts):
        fn = build_loss(cfg, counts)
        return [fn(logits[i:i + 1], labels[i:i + 1]).item() for i in range(2)]

    # Real counts only: the prior favours class 0, so the same logits cost the minority class more.
    head, tail = per_class(epoch_class_counts([90, 10]))
    assert tail > head + 0.5
    # The synthetic quota evens the epoch out (90 + 0, 10 + 80): the prior no longer tilts.
    head, tail = per_class(epoch_class_counts([90, 10], [0, 80]))
    assert tail == pytest.approx(head, abs=1e-5)


def test_prior_counts_real_leaves_the_synthetic_quota_out_of_the_loss_prior():
    base = ROOT / "configs/digits_ce.yaml"
    assert prior_counts(load_config(base), [90, 10], [0, 80]).tolist() == [90, 90]  # the default
    real = load_config(base, ["method.prior_counts=real"])
    assert prior_counts(real, [90, 10], [0, 80]).tolist() == [90, 10]
    with pytest.raises(ValueError, match="prior_counts"):
        load_config(base, ["method.prior_counts=synthetic"])
